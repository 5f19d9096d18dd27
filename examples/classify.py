"""Classify images with a pretrained model, in a few lines of library use.

    python examples/classify.py IMAGE [IMAGE...] [--model resnet50] [--checkpoint PATH]

Without ``--checkpoint`` the torchvision weights are downloaded once (or taken from torch hub's
folder), converted, and cached; later runs need neither network nor torch.
"""

import argparse

import resnext_flax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--checkpoint", help="a local .pth or converted .safetensors file")
    args = parser.parse_args()

    # Weights (eval mode), the weight set's preprocessing and its 1000 category names.
    predictor = resnext_flax.Predictor.from_pretrained(
        args.model, args.weights, checkpoint=args.checkpoint, top_k=5
    )
    predictions = predictor.classify(args.images)  # preprocess + one jitted forward per shape
    for i, path in enumerate(args.images):
        print(path)
        for label, probability in predictions.top(i):
            print(f"  {probability:7.2%}  {label}")


if __name__ == "__main__":
    main()
