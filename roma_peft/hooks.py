"""The only place where roma_peft changes PEFT's own classes, and only where PEFT offers no extension point.

* :func:`install_config_checks` (run by :func:`roma_peft.registration.register`, i.e. ``import roma_peft``): PEFT reads
  ``adapter_config.json`` itself, before any RoMA code can run, so a corrupt file or a bad RoMA field is only named
  clearly if PEFT's reader does it.
* :func:`install_peft_model_hooks` (run when the first RoMA adapter is created or loaded, by
  :meth:`roma_peft.model.RomaModel.inject_adapter`; not on import): the RoMA model card through ``save_pretrained`` and
  ``push_to_hub``, and the refusal to save a non-finite adapter or a pickled one. Every wrapper calls PEFT's method
  unchanged for models without a RoMA adapter.

Why these are wrappers and not subclasses or hooks: docs/design.md, "Changes to PEFT's classes".
"""

from __future__ import annotations

import json
import os
import warnings

from peft import PeftModel
from peft.config import PeftConfigMixin

from .config import read_adapter_config, validate_config_fields
from .constants import ADAPTER_CONFIG_NAME, PEFT_TYPE_NAME, has_roma_adapter, is_roma_config
from .export import update_model_card
from .layer import check_adapter_finite

__all__ = ["install_config_checks", "install_peft_model_hooks"]


def install_config_checks() -> None:
    """Make PEFT's own config reading fail clearly on a bad ``adapter_config.json`` (idempotent).

    ``PeftModel.from_pretrained``/``load_adapter`` first call ``PeftConfig._get_peft_type``, which indexes the raw JSON
    before any RoMA code runs, and transformers' ``load_adapter`` calls ``PeftConfig.from_pretrained``; both read the
    file with ``PeftConfigMixin.from_json_file``. Wrapped here:

    * ``from_json_file``: invalid JSON raises ``json.JSONDecodeError`` (same type as before) whose message names the
      file; a JSON value that is not an object raises ``ValueError``; a ``"peft_type": "ROMA"`` config has every field
      type-checked (:func:`~roma_peft.config.validate_config_fields`), naming the file and the field. Other methods'
      valid configs are returned unchanged.
    * ``_get_peft_type``: a local file is read once, by :func:`~roma_peft.config.read_adapter_config` (a missing or
      unknown ``peft_type`` raises ``ValueError`` naming the file, where PEFT raised ``KeyError: 'peft_type'``); a Hub
      repository goes through PEFT's own download and the wrapped ``from_json_file``.
    """
    if getattr(PeftConfigMixin, "_roma_config_checks", False):
        return
    original_read = PeftConfigMixin.__dict__["from_json_file"].__func__
    original_type = PeftConfigMixin.__dict__["_get_peft_type"].__func__

    def from_json_file(cls, path_json_file: str, **kwargs):
        try:
            values = original_read(cls, path_json_file, **kwargs)
        except json.JSONDecodeError as exc:
            raise json.JSONDecodeError(
                f"{path_json_file} is corrupt (not valid JSON: {exc.msg}). Re-save the adapter with "
                "save_pretrained(). Position",
                exc.doc,
                exc.pos,
            ) from exc
        if not isinstance(values, dict):
            raise ValueError(
                f"{path_json_file} is not an adapter config: it holds a JSON {type(values).__name__}, not an object "
                "with fields such as 'peft_type'. Re-save the adapter with save_pretrained()."
            )
        if values.get("peft_type") == PEFT_TYPE_NAME:
            validate_config_fields(values, source=str(path_json_file))
        return values

    def _get_peft_type(cls, model_id: str, **hf_hub_download_kwargs):
        subfolder = hf_hub_download_kwargs.get("subfolder", None)
        path = os.path.join(model_id, subfolder) if subfolder is not None else model_id
        config_file = os.path.join(str(path), ADAPTER_CONFIG_NAME)
        if os.path.isfile(config_file):
            # What PEFT does for a local file (read it, return its peft_type), with every error naming the file.
            return read_adapter_config(config_file)["peft_type"]
        try:
            return original_type(cls, model_id, **hf_hub_download_kwargs)
        except KeyError as exc:
            if exc.args != ("peft_type",):
                raise
            raise ValueError(
                f"The {ADAPTER_CONFIG_NAME} of {model_id!r} has no 'peft_type' field, so PEFT cannot tell which "
                'method made it. A RoMA adapter has "peft_type": "ROMA"; re-save it with save_pretrained().'
            ) from None

    from_json_file.__doc__ = original_read.__doc__
    _get_peft_type.__doc__ = original_type.__doc__
    PeftConfigMixin.from_json_file = classmethod(from_json_file)
    PeftConfigMixin._get_peft_type = classmethod(_get_peft_type)
    PeftConfigMixin._roma_config_checks = True


def install_peft_model_hooks() -> None:
    """Wrap three ``PeftModel`` methods for models that hold a RoMA adapter (idempotent; others are untouched).

    * ``save_pretrained``: the adapters being saved are checked for NaN/inf (``Δ`` and ``W + Δ`` in the model's dtype)
      *before* anything is written, so a refused save leaves no half-written folder (PEFT writes the model card
      first); ``safe_serialization=False`` would write a pickled ``adapter_model.bin``, which roma_peft never loads,
      so RoMA adapters are written as ``adapter_model.safetensors`` with a warning.
    * ``create_or_update_model_card`` (called by ``save_pretrained``): PEFT's card, then the RoMA section
      (:func:`~roma_peft.export.update_model_card`).
    * ``_upload_modified_files`` (the last step of transformers' ``push_to_hub``, after it replaced PEFT's README by a
      ``library_name: transformers`` card): the PEFT metadata and the RoMA section are written again into the folder
      being uploaded, with the loading snippet naming the repository pushed to.
    """
    if getattr(PeftModel, "_roma_model_hooks", False):
        return
    original_save = PeftModel.save_pretrained
    original_card = PeftModel.create_or_update_model_card
    original_upload = PeftModel._upload_modified_files

    def save_pretrained(self, save_directory, safe_serialization=True, selected_adapters=None, *args, **kwargs):
        configs = getattr(self, "peft_config", None) or {}
        roma = [name for name, config in configs.items() if is_roma_config(config)]
        if roma:
            if not safe_serialization:
                warnings.warn(
                    "save_pretrained(safe_serialization=False) would write a pickled adapter_model.bin, which "
                    "roma_peft does not load (RoMA adapters are never unpickled). Writing adapter_model.safetensors "
                    "instead.",
                    UserWarning,
                    stacklevel=2,
                )
                safe_serialization = True
            for name in roma if selected_adapters is None else [a for a in selected_adapters if a in roma]:
                check_adapter_finite(self, name)
        return original_save(self, save_directory, safe_serialization, selected_adapters, *args, **kwargs)

    def create_or_update_model_card(self, output_dir: str):
        result = original_card(self, output_dir)
        if has_roma_adapter(self):
            update_model_card(self, output_dir)
        return result

    def _upload_modified_files(self, working_dir, *args, **kwargs):
        if has_roma_adapter(self):
            original_card(self, str(working_dir))
            repo_id = kwargs.get("repo_id", args[0] if args else None)
            update_model_card(self, str(working_dir), adapter_id=repo_id if isinstance(repo_id, str) else None)
        return original_upload(self, working_dir, *args, **kwargs)

    save_pretrained.__doc__ = original_save.__doc__
    save_pretrained.__wrapped__ = original_save
    create_or_update_model_card.__doc__ = original_card.__doc__
    PeftModel.save_pretrained = save_pretrained
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel._upload_modified_files = _upload_modified_files
    PeftModel._roma_model_hooks = True
