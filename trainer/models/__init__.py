"""The model package: one file a model, registered by name (the machinery is in ``trainer/models/base.py``).

Adding a model = adding ``trainer/models/<name>.py`` (or a module of a package named in
``EDGE_TRAIN_MODEL_PACKAGES``) that declares its settings dataclass and its class, registered together with
``@register_model("<name>", settings=<Settings>)``, and its test; no other file changes. ``config/train.yaml``'s
model sections are generated from the registry (``edge-train config --dump``).

A model is trained on normal images (uint8 BGR [N,H,W,3] at the input size) and hands out an export
module: ``frames uint8 [N,H,W,3] BGR -> (score float32 [N], anomaly_map float32 [N,h,w])`` with the cast,
colour order, normalisation and all scoring inside the graph, so the ONNX file is the whole model.
"""

from trainer.models.base import (
    DISTILLATION,
    FAMILIES,
    FEATURE_MEMORY,
    FOREIGN_OBJECTS,
    GENERATIVE,
    NORMALIZING_FLOWS,
    ONE_CLASS,
    PLUGIN_ENV,
    SELF_SUPERVISED,
    SURFACE_DEFECTS,
    SYNTHETIC_ANOMALIES,
    AnomalyModel,
    ModelDefaults,
    ModelSettings,
    RunOptions,
    check_model_name,
    create_model,
    field_docs,
    get_model_class,
    known_model_names,
    list_models,
    model_catalogue,
    model_packages,
    model_sections,
    register_model,
    register_plugin_package,
    section_key,
    section_models,
    setting,
    settings_class,
    settings_title,
    unregister_plugin_package,
)

__all__ = [
    "DISTILLATION", "FAMILIES", "FEATURE_MEMORY", "GENERATIVE",
    "NORMALIZING_FLOWS", "ONE_CLASS", "SELF_SUPERVISED", "SYNTHETIC_ANOMALIES",
    "FOREIGN_OBJECTS", "PLUGIN_ENV", "SURFACE_DEFECTS", "AnomalyModel", "ModelDefaults", "ModelSettings",
    "RunOptions", "check_model_name", "create_model", "field_docs", "get_model_class", "known_model_names",
    "list_models", "model_catalogue", "model_packages", "model_sections", "register_model",
    "register_plugin_package", "section_key", "section_models", "setting", "settings_class", "settings_title",
    "unregister_plugin_package",
]
