"""What a worker really used: values read back from what vLLM reported (docs/vllm.md section 9)."""
