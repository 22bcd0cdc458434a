"""``python -m dpo_lightning fit --config recipes/tiny.yaml``"""

from dpo_lightning.cli import main

if __name__ == "__main__":
    main()
