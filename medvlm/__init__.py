"""medvlm: fine-tune, evaluate and diagnose medical vision-language models.

The flow (see the README): data_curation → training (stage 1 → stage 2) → eval → diagnostics.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns on import, on every CPU machine, that it could not fetch an optional faster
# 4-bit kernel from the hub ("kernels-community"). Nothing here asks for it, and peft imports
# bitsandbytes whenever it is installed, so the line would open every script's output. Only that
# message is dropped; the logger's other warnings still show.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
