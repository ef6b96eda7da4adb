"""The gateway: one OpenAI-compatible endpoint in front of a garden's workers.

`gardenctl gateway` serves `/v1/*` and routes each request by its `model` (a served name) to a
ready worker of that model (`upstream`), found by observing the garden's runtime read-only
(`discovery`); standby models are woken for a request and put to sleep when idle, or started
and stopped (`standby: stop`, by `gardenctl watch` on the gateway's demand file) (`sleepers`,
by the pure rule of `standby`); errors in OpenAI's format (`errors`); Prometheus metrics
(`metrics`); the HTTP side (`routes`, `app`, `background`) on aiohttp. Only the CLI imports
this package (and so aiohttp).
"""
