"""Black-box teachers: a model that only answers queries over an API.

`wire` is the HTTP format, `server` answers it (`dfkd serve`), `teacher` asks it (a
`BlackBoxTeacher` behind `--teacher http://HOST:PORT`, metered against `--query-budget`), and
`query_log` keeps every paid answer in the run directory so that a resumed run never pays twice.
"""
