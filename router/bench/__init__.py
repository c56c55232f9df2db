"""`kvrouter bench`: replay a seeded agent-session workload against an
OpenAI-compatible endpoint (or, with --compare, against kvrouter, kvrouter
--no-kv-cache, mlx_lm.server and SMG in front of kvrouter workers or of its own
MLX workers, started on the same weights) and measure it.

Modules: `workload` (pure: the sessions, the request schedule, the oracle),
`client` (async openai client, progress bar, one record per request),
`servers` (start, restart and stop the programs compared), `smg` (the SMG
configurations: installing SMG and its MLX worker, their command lines), `report`
(summary.json, side-by-side table, PNG plots), `routing` (micro-benchmark of
the routing decision), `cli` (the command line).
"""
