"""The Gradio Space: per-layer expert routing of an image and a prompt (`app.py`; `moe-vlm demo` launches it).

The folder deploys to a Hub Space as it is, so its modules import only what `requirements.txt` installs."""
