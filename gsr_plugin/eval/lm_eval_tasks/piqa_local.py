"""Dataset loader for the ``piqa_local`` lm-eval task (``custom_dataset``)."""

from datasets import Dataset, DatasetDict

from gsr_plugin.eval.data import piqa_validation


def load_piqa(data_dir=None, **_metadata) -> DatasetDict:
    """lm-eval passes the task metadata (``version``, and ``data_dir`` when given)."""
    return DatasetDict({"validation": Dataset.from_list(piqa_validation(data_dir))})
