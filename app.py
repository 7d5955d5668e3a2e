"""Hugging Face Spaces entry point for the MAGI-1 web app (`magi-app`); see docs/app.md.

A Space runs `python app.py`: this serves the app on 0.0.0.0:7860 with the model named below. Extra arguments are
those of `magi-app` (`python app.py --model path/to/folder --size 480`). The package is imported from this clone's
`src/` folder, so the Space needs only its dependencies installed (docs/app.md lists them).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from diffusers_magi.app import main  # noqa: E402

# The model the Space serves: a Hub id (or folder) written by `magi-convert`, e.g. "your-name/MAGI-1-4.5B-distill".
# "tiny-random" (random weights, a smoke test) runs on any hardware.
MODEL = "tiny-random"

if __name__ == "__main__":
    sys.exit(main(["--model", MODEL, "--host", "0.0.0.0", "--port", "7860", *sys.argv[1:]]))
