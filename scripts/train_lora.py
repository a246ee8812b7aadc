"""Train a LoRA on a folder of captioned images: the same as ``sdjax train-lora`` (see ``sdjax.lora_train``).

    python scripts/train_lora.py --data my_images/ --out runs/my_lora --rank 8 --steps 1000 \
        --model path/to/diffusers_model --batch-size 4 --cache-latents --sample-every 200 --sample-prompt "..."
"""

import sys

from sdjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-lora", *sys.argv[1:]]))
