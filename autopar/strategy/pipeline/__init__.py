"""Pipeline planning: which stage runs what, how stages are tied, and which pipeline to run.

* :mod:`.assignment` -- the stage of every traced node and the values crossing stages;
* :mod:`.stage_graph` -- one stage's forward graph cut out of the whole, with the objective
  whose gradient is that stage's backward pass;
* :mod:`.planner` -- the pipeline plan: every stage's sharding plan and the layouts tying
  stages (crossings, shared parameters); :mod:`.files` saves it as a strategy file, a
  separate step;
* :mod:`.stage_search` -- the joint search over stages, layer split, data x model degrees,
  micro-batches, recompute and optimizer parallel, on the cost model;
* :mod:`.registry` -- the model families that search prices, registered from ``autopar.models``.

Executing a pipeline (schedules, the runner, gradients and memory per stage) is
``autopar.runtime.pipeline``'s.
"""
