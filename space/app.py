"""The moe-vlm Space: per-layer expert routing of an image and a prompt, as a person can see it.

Give it an image and a prompt; it answers (greedy, `MAX_NEW_TOKENS` new tokens) and shows, for every MoE layer,
which expert each image, prompt and answer token went to and with what router probability, each layer's load
split by modality, and the text tokens coloured by expert at a chosen layer. The routing-mode selector replays
the same input under `hard` (image → expert 0, text → expert 1), `gumbel`, `softmax`, or the model's own routing
`inverted` (every token sent to the other expert: the crossover test).

The prompt reaches the model in the format it was trained on: an instruction-tuned (Stage 3) model gets it as the
user's turn of the processor's chat template (`<s>[INST] <image>\\nprompt [/INST]`), other stages get it as it is
(`model_source.choose_prompt_format` says how the choice is made; `PROMPT_FORMAT=raw|chat` overrides it).

Runs as a Hub Space as it is (`python app.py`; only `requirements.txt` is installed there, so nothing here imports
the project's other packages) and from the repository as `moe-vlm demo`. The model comes from `MODEL_ID` (a Hub id
or a local directory); see `model_source.py` for the defaults.

Both launch paths serve on 127.0.0.1 (this machine only) unless told otherwise: `--host`, else `$GRADIO_SERVER_NAME`
(a Hub Space sets it to 0.0.0.0, which it must: its proxy reaches the app over the network). Uploads above
`MAX_UPLOAD_BYTES` are refused by the server; a model directory holding pickled weights is refused unless
`--allow-pickle` (or `ALLOW_PICKLE_WEIGHTS=1`) says it is trusted.
"""

from __future__ import annotations

import argparse
import os
import threading
import warnings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Tick labels name tokens of any script; glyphs the default font lacks show as boxes, not as a log line per request.
warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import SafetensorError  # noqa: E402  (transformers' own dependency: in every Space)
from transformers import AutoModelForCausalLM, AutoProcessor  # noqa: E402

if __package__:  # imported as `space.app`: the repository, `moe-vlm demo`, the tests
    from . import routing_view as view
    from .input_checks import InputError, check_prompt, load_image
    from .model_source import (
        ModelChoice,
        allow_pickle_from_env,
        choose_model,
        choose_prompt_format,
        refuse_pickles,
    )
    from .serving import add_launch_arguments, exposure_warning, launch_options
    from .shapes_examples import example_inputs
else:  # run as a script: a Hub Space runs `python app.py` inside this folder
    import routing_view as view
    from input_checks import InputError, check_prompt, load_image
    from model_source import (
        ModelChoice,
        allow_pickle_from_env,
        choose_model,
        choose_prompt_format,
        refuse_pickles,
    )
    from serving import add_launch_arguments, exposure_warning, launch_options
    from shapes_examples import example_inputs

MAX_NEW_TOKENS = 20
# The selector's modes; `inverted` is the model's own routing mode with every token sent to the other expert.
ROUTING_MODES = ("hard", "gumbel", "softmax", "inverted")
API_NAME = "run"  # the endpoint gradio_client calls: /run


class RoutingDemo:
    """The loaded model and processor, and one request's work under a lock: routing switches change the shared
    model in place, so two requests must not interleave, and each request restores the model's own mode."""

    def __init__(self, choice: ModelChoice, allow_pickle: bool | None = None):
        """`allow_pickle`: load pickled weights (None: `$ALLOW_PICKLE_WEIGHTS`); without it a local directory
        holding a pickle is refused (`model_source.refuse_pickles`) and only safetensors weights are read."""
        self.choice = choice
        allow_pickle = allow_pickle_from_env() if allow_pickle is None else allow_pickle
        refuse_pickles(choice, allow_pickle)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                choice.source, trust_remote_code=True, use_safetensors=None if allow_pickle else True
            ).eval()
            self.processor = AutoProcessor.from_pretrained(choice.source, trust_remote_code=True)
        # A Hub id that does not exist, no network to fetch it, no safetensors weights, or a cut-off weights file.
        except (OSError, SafetensorError) as error:
            hint = "" if allow_pickle else " (the Space reads safetensors weights only: see --allow-pickle)"
            raise FileNotFoundError(f"could not load the model {choice.source!r}: {error}{hint}") from None
        if not hasattr(self.model, "set_router_mode") or not self.model.config.moe_layers:
            raise ValueError(
                f"{choice.source} is not a moe-vlm model with MoE layers (model_type="
                f"{self.model.config.model_type!r}); there is no routing to show"
            )
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.native_mode = self.model.config.router_mode
        self.prompt_format, self.prompt_format_reason = choose_prompt_format(choice, self.processor)
        self.lock = threading.Lock()

    def model_text(self, text: str) -> str:
        """The person's `text` (with its `<image>` marker) in the model's prompt format: as it is (`raw`), or as the
        user's turn of the chat template, ending where the answer starts (`chat`)."""
        if self.prompt_format == "chat":
            conversation = [{"role": "user", "content": text}]
            return self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return text

    @property
    def modes(self) -> list[str]:
        """The selector's choices; the model's own mode is among them (e.g. `modality_aware`)."""
        return list(ROUTING_MODES) + ([self.native_mode] if self.native_mode not in ROUTING_MODES else [])

    def _set_mode(self, mode: str) -> None:
        if mode not in self.modes:
            raise InputError(f"Unknown routing mode {mode!r}; choose one of {', '.join(self.modes)}.")
        self.model.set_router_mode(self.native_mode if mode == "inverted" else mode)
        self.model.set_invert_routing(mode == "inverted")

    def _reset(self) -> None:
        self.model.set_router_mode(self.native_mode)
        self.model.set_invert_routing(False)

    def run(self, image: Image.Image, text: str, mode: str) -> tuple[str, dict]:
        """Answer `text` about `image` under routing `mode`; returns `(answer, routing)` (see `routing_view`)."""
        try:
            inputs = self.processor(images=[image], text=[self.model_text(text)], return_tensors="pt")
        except ValueError as error:  # the processor's own checks (e.g. a literal '[IMG]' in the prompt)
            raise InputError(str(error)) from None
        limit = self.model.config.max_position_embeddings - MAX_NEW_TOKENS
        n_prompt = inputs["input_ids"].shape[1]
        if n_prompt > limit:
            raise InputError(
                f"The prompt is {n_prompt} tokens with the image's placeholders; this model takes at most {limit}. "
                "Shorten it."
            )
        inputs = inputs.to(self.model.device)
        tokenizer = self.processor.tokenizer
        with self.lock:
            try:
                self._set_mode(mode)
                # (1, prompt + answer): greedy, so a mode's answer is reproducible
                ids = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
                tokens = tokenizer.convert_ids_to_tokens(ids[0].tolist())
                routing = view.read_routing(self.model, ids, inputs["pixel_values"], tokens, n_prompt)
            finally:
                self._reset()
        answer = tokenizer.decode(ids[0, n_prompt:], skip_special_tokens=True).strip()
        return answer or "(no text: the model ended its answer at once)", routing


def with_plain_upload_errors(image: gr.Image) -> gr.Image:
    """Make `image` report unreadable uploads plainly. Gradio opens an upload with PIL before the handler runs, so
    a file that is not an image (or a decompression bomb) would otherwise end as a bare 'Error'. (Wrapping the
    instance, not subclassing: a component subclass makes Gradio write a `.pyi` stub beside this file.)"""
    preprocess = image.preprocess

    def preprocess_checked(payload):
        try:
            return preprocess(payload)
        except (OSError, Image.DecompressionBombError):
            try:
                load_image(payload.path)  # fails again, with the message a person can act on
            except InputError as error:
                raise gr.Error(str(error), title="Check the image", print_exception=False) from None
            raise

    image.preprocess = preprocess_checked
    return image


def build_demo(model_id_or_path: str | None = None, allow_pickle: bool | None = None) -> gr.Blocks:
    """The Blocks app for one model (see `model_source.choose_model` for what `None` picks; `RoutingDemo` for
    `allow_pickle`)."""
    demo_model = RoutingDemo(choose_model(model_id_or_path), allow_pickle)
    config = demo_model.model.config
    moe_layers = [int(i) for i in config.moe_layers]
    colour_map = view.expert_colour_map(config.num_experts)

    def run(image_path, prompt, mode, layer):
        try:
            image, note = load_image(image_path)
            answer, routing = demo_model.run(image, check_prompt(prompt), mode)
        except InputError as error:
            raise gr.Error(str(error), title="Check the input", print_exception=False) from None
        if note:
            gr.Warning(note)
        title = f"Routing under '{mode}': expert per token and MoE layer"
        return (
            answer,
            view.figure_to_image(view.heatmap_figure(routing, title)),
            view.figure_to_image(view.load_figure(routing)),
            view.highlighted_tokens(routing, view.nearest_layer(routing, layer)),
            routing,
        )

    def highlight(routing, layer):
        return view.highlighted_tokens(routing, view.nearest_layer(routing, layer)) if routing else []

    # The page opens on a worked example: the first Shapes example in the inputs, and its result, computed once (on
    # the first page load, so the app starts as fast as before) and shown to every visitor without pressing Run.
    examples = example_inputs()
    first_example = examples[0] if examples else None
    worked_example: dict = {}
    worked_example_lock = threading.Lock()

    def show_worked_example():
        with worked_example_lock:
            if "outputs" not in worked_example:
                image_path, text = first_example
                worked_example["outputs"] = run(image_path, text, demo_model.native_mode, max(moe_layers))
        return worked_example["outputs"]

    with gr.Blocks(title="moe-vlm: per-layer expert routing") as demo:
        gr.Markdown(
            "# moe-vlm: which expert sees which token\n"
            "Upload an image (or pick an example), type a prompt and press **Run**: the model answers and every "
            "MoE layer shows the expert each image, prompt and answer token went to. Switch the routing mode to "
            "see the same input under each. The page opens on the first example, already run.\n\n"
            f"{demo_model.choice.describe()} — MoE layers {moe_layers}, {config.num_experts} experts, "
            f"trained routing mode `{demo_model.native_mode}`; prompts in the `{demo_model.prompt_format}` format "
            f"({demo_model.prompt_format_reason})."
        )
        with gr.Row():
            with gr.Column(scale=1):
                # type="filepath", image_mode=None: the handler gets the file untouched and checks it itself.
                image = with_plain_upload_errors(
                    gr.Image(
                        value=first_example[0] if first_example else None,
                        label="Image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="image",
                        height=260,
                    )
                )
                prompt = gr.Textbox(
                    value=first_example[1] if first_example else None,
                    label="Prompt",
                    placeholder="e.g. Describe the image.",
                    elem_id="prompt",
                )
                mode = gr.Radio(
                    demo_model.modes,
                    value=demo_model.native_mode,
                    label="Routing mode",
                    info="inverted: the model's own routing with every token sent to the other expert",
                )
                run_button = gr.Button("Run", variant="primary", elem_id="run")
                gr.Examples(examples, inputs=[image, prompt], label="Shapes examples")
            with gr.Column(scale=2):
                answer = gr.Textbox(label="Generated answer (greedy)", elem_id="answer", interactive=False)
                layer = gr.Slider(
                    min(moe_layers),
                    max(moe_layers),
                    value=max(moe_layers),
                    step=1,
                    label="Layer for the token colours",
                    elem_id="layer",
                )
                tokens = gr.HighlightedText(
                    label="Prompt and answer tokens, coloured by the expert they went to",
                    color_map=colour_map,
                    show_legend=True,
                    elem_id="tokens",
                )
                load = gr.Image(
                    label="Expert load per layer, by modality",
                    type="pil",
                    format="png",
                    interactive=False,
                    show_label=False,  # the figure carries its own title; a label box would cover it
                    elem_id="load",
                )
        heatmap = gr.Image(
            label="Layer × token routing",
            type="pil",
            format="png",
            interactive=False,
            show_label=False,
            elem_id="heatmap",
        )
        routing = gr.State(None)

        gr.on(
            [run_button.click, prompt.submit],
            run,
            inputs=[image, prompt, mode, layer],
            outputs=[answer, heatmap, load, tokens, routing],
            api_name=API_NAME,
        )
        layer.change(highlight, inputs=[routing, layer], outputs=tokens, api_name=False)
        if first_example:
            demo.load(show_worked_example, outputs=[answer, heatmap, load, tokens, routing], api_name=False)
    return demo


def main(argv: list[str] | None = None) -> None:
    """`python app.py [--model ...] [--host ...] [--port ...] [--allow-pickle]`: what a Hub Space runs (no options:
    `MODEL_ID`, the card, and Gradio's variables decide)."""
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    add_launch_arguments(parser, port_default=None)
    args = parser.parse_args(argv)
    options = launch_options(args.host, args.port)
    try:
        demo = build_demo(args.model, args.allow_pickle)
    except (ValueError, FileNotFoundError) as error:  # bad input a person can fix: one line, no traceback
        parser.exit(2, f"app.py: error: {error}\n")
    warning = exposure_warning(options["server_name"])
    if warning:
        print(f"app.py: {warning}", flush=True)
    demo.launch(**options)


if __name__ == "__main__":  # a Hub Space runs `python app.py`
    main()
