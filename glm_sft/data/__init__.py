"""Read training data into canonical conversations; every problem is reported as `path:line: what is wrong`.

Input formats: ChatGLM3 / GLM-4 `messages` (role/content), ShareGPT (from/value), Alpaca, Firefly and a
prompt/response column pair. Tool-calling rows in the ChatGLM3/Firefly, GLM-4, OpenAI/Hugging Face and ShareGPT
shapes become canonical rows with `tools` and assistant `tool_calls` (glm_sft.tools).
Files: .json (a list, or one object per line), .jsonl, .csv, .parquet, folders of them, comma-separated lists of
those, and hub dataset ids.

The modules: sources (files, folders, hub ids into rows with their lines), formats (rows into turns), checks (turns
as a conversation, and the DataError report), reader (read_conversations) and split (read_datasets, split_rows).
"""

from glm_sft.data.checks import DataError
from glm_sft.data.formats import DATASET_FORMATS, ROLES, SHAREGPT_ROLES
from glm_sft.data.reader import PLACEHOLDER_RECIPE_KEYS, DataStats, read_conversations
from glm_sft.data.sources import SUPPORTED_EXTENSIONS
from glm_sft.data.split import read_datasets, split_rows

__all__ = [
    "DATASET_FORMATS",
    "PLACEHOLDER_RECIPE_KEYS",
    "ROLES",
    "SHAREGPT_ROLES",
    "SUPPORTED_EXTENSIONS",
    "DataError",
    "DataStats",
    "read_conversations",
    "read_datasets",
    "split_rows",
]
