#!/usr/bin/env python3
"""Convert an official PANNs checkpoint (e.g. Cnn14_mAP=0.431.pth, Cnn14_16k_mAP=0.438.pth,
legacy torch.save format) into model.safetensors for prefixcap, with PANNs' own key names.

    python3 scripts/convert_panns.py Cnn14_mAP=0.431.pth models/cnn14/model.safetensors

Needs Python 3 with torch (Debian: apt-get install python3-torch). Put a config.json next to
the output (model_type "cnn14", sample_rate, window_size, hop_size, mel_bins, fmin, fmax,
classes_num; see README) and load the folder with prefixcap.
"""
import os
import subprocess
import sys

if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
    print(__doc__)
    sys.exit(0 if len(sys.argv) == 2 else 2)
here = os.path.dirname(os.path.abspath(__file__))
sys.exit(subprocess.call([sys.executable, os.path.join(here, "convert_checkpoint.py"), sys.argv[1], sys.argv[2],
                          "--key", "model"]))
