"""Running a pipeline plan (``autopar.strategy.pipeline`` makes it) on this rank.

* :mod:`.program` -- the compiled pipeline training step (``PipelineGradProgram``);
* :mod:`.schedule` -- schedules as data: the clock x stage table of GPipe and 1F1B;
* :mod:`.runner` -- walks a schedule: forward, backward, send and receive per micro-batch;
* :mod:`.split` -- a stage's backward split into the halves run at different clocks;
* :mod:`.grads` -- gradients accumulated over micro-batches and reduced once per step;
* :mod:`.shards` -- this rank's parameter shards of a stage (and the absent ones);
* :mod:`.dropout` -- dropout masks of a micro-batch equal to the whole batch's slice;
* :mod:`.memory` -- peak bytes of a step with every micro-batch in flight.
"""
