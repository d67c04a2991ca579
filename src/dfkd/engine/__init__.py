"""The distillation engine behind `dfkd distill`: the budgeted loop, where its batches come from,
the plan of its rounds and its counters."""
