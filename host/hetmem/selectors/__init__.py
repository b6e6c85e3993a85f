"""The learned selectors: training them on a frozen model (`hetmem calibrate`) and their
weights file.

Two selectors learn from the model's own dense attention, the model itself never changes:
DSA's lightning indexer and SeerAttention-R's AttnGate (`calibrate.py` says how). The rooms:

- `activations`: capturing each attention layer's queries and keys (`capture`);
- `objective`: the students' scores (the methods' own functions), the teachers, the KL;
- `train`: one layer's training loops (`train_indexer`, `train_gate`);
- `data`: the calibration sequences (text, tasks, the gate's answer queries);
- `weights`: `Selectors` and the safetensors file beside the model (`save_selectors`,
  `load_selectors`, `selectors_for`, `trained_spec`, which `hetmem.models.wrap` reads);
- `calibrate`: the whole job (`calibrate`, `calibrate_dir` behind `hetmem calibrate`).

Nothing is imported here: name the module (`from hetmem.selectors.weights import
load_selectors`).
"""
