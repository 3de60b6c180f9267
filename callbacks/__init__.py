"""Lightning callbacks for DSF pruning, installed as ``dsf_lightning.callbacks``."""
