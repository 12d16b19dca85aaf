"""Conformance harness: transformers' own common model tests, run against MoeVlm in every router mode.

The tests come from the sdist of the installed transformers, downloaded at run time and cached (`sdist.py`; none of
them is copied into this repository). They are first run on transformers' own Mistral and Mixtral; the tests both
pass form the calibrated list of that transformers version (`calibrated/transformers-<version>.txt`, derived by the
harness and committed). MoeVlm must then pass every calibrated test in every router mode.

    python -m tests.conformance calibrate          # derive (or re-derive with --force) the list of this version
    python -m tests.conformance run --mode hard    # one router mode (default: all), report failures by cause
    pytest tests/test_transformers_conformance.py  # the same, one pytest test per router mode

Everything that imports the sdist's files runs in a pytest subprocess (`runner.py`), so the project's own test run
never imports them. Modules: `sdist` (download, cache, package layout), `testers` (tiny model testers), `cases` (the
unittest classes), `plugin` (deselects uncalibrated tests), `results` (junit parsing, failure summaries),
`calibration` (the list files), `runner` (the subprocess), `__main__` (the command line).
"""

# Calibrated tests that cannot apply to MoeVlm's text-only tester, each with its reason and the project test that
# checks the same property on the real (vision) model instead. Excluded from the MoeVlm runs and named in every report.
NOT_APPLICABLE = {
    **{
        f"test_get_image_features_{name}": "needs pixel inputs (Mistral and Mixtral pass it by having no "
        "get_image_features); tests/test_model.py::test_get_image_features_follows_the_transformers_contract"
        for name in ("output_0", "output_1", "output_2", "hidden_states", "attentions")
    },
    **{
        name: "transformers' `_set_config_rope_params` steps into a sub-config that is None (the text-only "
        "vision_config) and fails before the model runs; tests/test_model.py::"
        "test_rope_scaling_extends_the_context_past_max_position_embeddings"
        for name in (
            "test_model_rope_scaling_frequencies",
            "test_model_rope_scaling_from_config_0_linear",
            "test_model_rope_scaling_from_config_1_dynamic",
            "test_model_rope_scaling_from_config_2_yarn",
        )
    },
}

MISTRAL_CASE = "MistralModelTest"  # the class names in cases.py
MIXTRAL_CASE = "MixtralModelTest"


def moe_vlm_case(mode: str) -> str:
    """Name of the MoeVlm test class of one router mode, e.g. `MoeVlmModalityAwareModelTest`."""
    return "MoeVlm" + "".join(part.title() for part in mode.split("_")) + "ModelTest"
