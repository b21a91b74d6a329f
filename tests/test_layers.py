"""The layering of rmt (the contract is in pyproject.toml, checked by `lint-imports`): what `import rmt` costs."""
import json
import subprocess
import sys

CHILD = r"""
import json, sys
import rmt, timm
print(json.dumps({"modules": sorted(m for m in sys.modules if m.startswith("rmt.")),
                  "registered": sorted(timm.list_models("rmt_*"))}))
"""


def test_import_rmt_registers_the_models_without_the_training_layer_or_the_tasks():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert {"rmt_t", "rmt_s", "rmt_b", "rmt_l"} <= set(loaded["registered"])
    assert "rmt.runtime.classifier" in loaded["modules"]  # rmt.predict
    above_the_runtime = {"training", "tools", "classification", "detection", "segmentation", "cli", "__main__"}
    assert [m for m in loaded["modules"] if m.split(".")[1] in above_the_runtime] == []
