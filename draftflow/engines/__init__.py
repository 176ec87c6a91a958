"""Serving engines that judge an exported draft beside DraftFlow's own evaluator.

DraftFlow's evaluator (`evaluate.py`) shares its model code with training, so a
convention both get wrong would pass it; an engine loads the exported folder with its
own code. `vllm.py` runs real vLLM (an optional extra) in a child process
(`vllm_worker.py`, the only module that imports vLLM).
"""
