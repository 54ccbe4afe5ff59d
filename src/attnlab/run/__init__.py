"""Run directories: opening one (``open``), what ``--resume`` accepts (``resume``), what a run records of its
data, config and layout and checks later (``identity``), the plugin files it keeps (``plugins``), and its own
tokenizer and vocabulary metadata, which sample and export without the dataset (``vocabulary``).
Locks and the rules for replacing folders are ``attnlab.folders``'s, shared with datasets and sweeps."""
