"""Step 2: consolidating a library's experts (DESIGN §3)."""

from fl2t.consolidate.model import ConsolidatedModel, ProxyDecoderLayer
from fl2t.consolidate.train import canonical, consolidate, load_consolidated, save_consolidated, set_hash

__all__ = ["ConsolidatedModel", "ProxyDecoderLayer", "canonical", "consolidate", "load_consolidated", "save_consolidated", "set_hash"]
