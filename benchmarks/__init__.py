"""Side-by-side speed and memory of the MoE VLM and the dense model it replaces (`moe-vlm bench`).

`presets` (what is measured), `cases` (the sections: each builds its inputs once), `naive` (the compute-both-experts
comparison block, which exists only here), `timing` (interleaved repeated timing, peak memory), `flops` (model
FLOPs, MFU), `report` (JSON + Markdown), `run` (one process, every section), `cli` (`moe-vlm bench`).
"""
