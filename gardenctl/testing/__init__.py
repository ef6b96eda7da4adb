"""Helpers for gardenctl's end-to-end tests and demo that run real processes without a GPU.

`gardenctl.testing.standin_vllm` is a stand-in for `vllm serve` (console script
`standin-vllm`): it speaks vLLM's HTTP API and prints the start-up logs of a chosen vLLM
release (`STANDIN_VLLM_VERSION`), but loads no model and uses no GPU, unless
`STANDIN_VLLM_ALLOCATE=1` asks `standin_gpu` to hold the reported bytes with PyTorch (imported
only then). Modules here import only the standard library and `gardenctl.data`, never the
rest of gardenctl, so that they start fast and keep working whatever the planner imports.
"""
