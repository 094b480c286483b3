"""C-MCR: connect two contrastive spaces that share a modality, from precomputed embeddings (arXiv 2305.14381)."""
from polyalign.config.connect import ConnectConfig, load_connect_config, validate_connect
from polyalign.connect.data import ConnectData, load_inputs, load_shared
from polyalign.connect.model import ConnectedSpaces
from polyalign.connect.run import evaluate_connect_run, is_connect_run, run_connect
from polyalign.connect.train import connect, pseudo_pairs, train_connection

__all__ = ["ConnectConfig", "ConnectData", "ConnectedSpaces", "connect", "evaluate_connect_run", "is_connect_run",
           "load_connect_config", "load_inputs", "load_shared", "pseudo_pairs", "run_connect", "train_connection",
           "validate_connect"]
