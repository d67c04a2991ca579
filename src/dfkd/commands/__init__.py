"""One module per `dfkd` command that is more than a call into the engine: bench and its suites,
quickstart, quantize, synthesize, train-teacher, throughput. `cli.py` only parses arguments."""
