"""Convert a ChatGLM3 checkpoint (THUDM's remote-code layout) to transformers' native GLM classes.

    python convert_chatglm3.py models/chatglm3-6b --out models/chatglm3-6b-hf
    python train.py --config recipes/glm3_lora.yaml --model_name_or_path models/chatglm3-6b-hf

Works for chatglm3-6b, chatglm3-6b-base and chatglm3-6b-32k. The result loads without trust_remote_code, computes
the same function as the original, and its tokenizer gives the same ids as ChatGLM3's own chat format.
"""

import argparse

from glm_sft import exit_on_user_error
from glm_sft.chatglm3 import convert_chatglm3


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the downloaded ChatGLM3 directory (config.json with model_type chatglm)")
    parser.add_argument("--out", required=True, help="the directory to write the converted model to")
    args = parser.parse_args(argv)
    output = convert_chatglm3(args.source, args.out)
    print(f"wrote {output}; use it with --model_name_or_path {output}")


if __name__ == "__main__":
    main()
