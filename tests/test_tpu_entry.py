"""What a TPU launch needs that runs without torch_xla: the recipes' main(), the bf16 guard, the loader fix.

The XLA runs themselves are in tests/xla (`./run.sh test-xla`).
"""

import subprocess
import sys

import pytest

from swa_accel.runner.config import ConfigError
from swa_accel.runner.xla import expose_loader_dataset, refuse_bf16_storage
from tests.helpers.launch import ROOT

# What accelerate's TPU launcher does: the script's folder on sys.path, import it by name, call `main`.
IMPORT_AS_THE_TPU_LAUNCHER_DOES = """
import sys
sys.path.append(sys.argv[1])
sys.argv = ["train.py"]
import train
from accelerate.state import PartialState
print(callable(train.main), PartialState._shared_state == {})
"""


@pytest.mark.parametrize("recipe", ["vision", "text"])
def test_a_recipe_imports_without_doing_any_work_and_offers_main(recipe, tmp_path):
    result = subprocess.run([sys.executable, "-c", IMPORT_AS_THE_TPU_LAUNCHER_DOES, str(ROOT / "recipes" / recipe)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"]  # main exists; no Accelerator was built on import
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_xla_bf16_storage_is_refused_only_for_an_averaging_run():
    for variable in ("XLA_USE_BF16", "XLA_DOWNCAST_BF16"):
        with pytest.raises(ConfigError, match=f"^launch: {variable}=1 makes XLA store every float32 tensor as bf16"):
            refuse_bf16_storage(True, {variable: "1"})
        refuse_bf16_storage(False, {variable: "1"})  # nothing averaged, nothing to lose
        refuse_bf16_storage(True, {variable: "0"})
    refuse_bf16_storage(True, {})


def test_the_xla_loader_wrapper_gets_the_dataset_that_checkpointing_reads():
    class Inner:
        dataset = object()

    class Wrapper:  # like accelerate's MpDeviceLoaderWrapper: the prepared loader is `_loader`
        _loader = Inner()

    wrapper = Wrapper()
    expose_loader_dataset(wrapper)
    assert wrapper.dataset is Inner.dataset
