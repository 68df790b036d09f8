"""Models written as serial Cells: PanGu-α (the reference model)."""
