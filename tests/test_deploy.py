"""The deployment files (deploy/): they name only settings the service has; the image's pins swap TensorFlow."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from street2shop.service.config import ServiceConfig, env_name

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize("name", ["Containerfile", "compose.yaml", "k8s/search.yaml"])
def test_deployment_files_set_only_variables_the_service_reads(name):
    # A misspelt variable (STREET2SHOP_MAX_UPLOAD_MBS) would be ignored without a word; ${STREET2SHOP_...}
    # are the compose file's own substitutions (host paths), not the container's environment.
    text = (DEPLOY / name).read_text()
    settings = {env_name(f.name) for f in dataclasses.fields(ServiceConfig)}
    substituted = set(re.findall(r"\$\{(STREET2SHOP_[A-Z_]+)", text))
    named = set(re.findall(r"\bSTREET2SHOP_[A-Z][A-Z_]*", text)) - substituted
    assert named, f"{name} sets no STREET2SHOP_ variable"
    assert named <= settings, f"{name} names variables the service does not read: {sorted(named - settings)}"


def _pin_requirements():
    spec = importlib.util.spec_from_file_location("pin_requirements", DEPLOY / "pin_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_are_what_pip_resolved_with_tensorflow_swapped():
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          [("street2shop", "0.9.0"), ("tensorflow", "2.21.0"), ("Tensorflow_Serving.API", "2.21.0"), ("numpy", "2.1.3")]]}
    pins = _pin_requirements().pins
    assert pins(report, "tensorflow-cpu", {"street2shop"}) == ["tensorflow-cpu==2.21.0", "Tensorflow_Serving.API==2.21.0", "numpy==2.1.3"]
    assert pins(report, "tensorflow", {"street2shop"})[0] == "tensorflow==2.21.0"
    with pytest.raises(SystemExit, match="tensorflow is not among"):
        pins({"install": report["install"][2:]}, "tensorflow-cpu", set())
