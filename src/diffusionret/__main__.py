"""``python -m diffusionret`` entry point (also what ``torchrun -m diffusionret`` runs)."""

import sys

from diffusionret.cli import main

if __name__ == "__main__":
    sys.exit(main())
