"""Step 2: consolidating a library's experts (DESIGN §3).

    model = consolidate(lib, settings)                # train (train.py)
    lib.save_consolidated(model.save_pretrained)      # place it in LIB/consolidated/, atomically
    pipe = FL2TPipeline.from_pretrained(library=lib)  # generate (pipeline.py)

`model.py` holds the model and its on-disk form, `common.py` what training and inference share.
"""

from fl2t.consolidate.common import canonical, set_hash
from fl2t.consolidate.model import ConsolidatedConfig, ConsolidatedModel, ProxyDecoderLayer
from fl2t.consolidate.train import consolidate

__all__ = ["ConsolidatedConfig", "ConsolidatedModel", "ProxyDecoderLayer", "canonical", "consolidate", "set_hash"]
