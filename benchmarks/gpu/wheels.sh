#!/usr/bin/env bash
# Before a GPU lease, on the CPU box, in the repository's root: the wheels the lent machine's image lacks, for its
# Python 3.12 (see /work/.library/device/KINDS.md), into .whl/ (ignored through .git/info/exclude; `run.sh`
# installs them there). The image has torch, numpy, scipy, protobuf, uvloop, msgpack, psutil, aiohttp, peft,
# accelerate, safetensors, tokenizers and huggingface-hub. Carried: hivemind 1.1.12 and its small dependencies,
# pydantic, cryptography, transformers at the version CI tests (the image's is older), and bitsandbytes cut down
# to its CPU and CUDA 13 libraries (the whole wheel, 43 MB, would not fit the 64 MiB a call carries).
#     bash benchmarks/gpu/wheels.sh        # ~40 MB, a minute
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platform=(--only-binary=:all: --python-version 3.12 --implementation cp --platform any)
for tag in 2_28 2_27 2_24 2_17 2014 1; do
    case $tag in 2014 | 1) platform+=(--platform "manylinux${tag}_x86_64") ;; *) platform+=(--platform "manylinux_${tag}_x86_64") ;; esac
done
wheels=(
    hivemind==1.1.12 configargparse==1.9.0 py-multihash==3.0.0 py-cid==0.5.0 py-multibase==2.0.0
    py-multicodec==1.0.0 morphys==1.0 base58==2.1.1 netaddr==1.3.0 blake3==1.0.11 mmh3==5.3.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 transformers==5.24.0 bitsandbytes==0.50.2
)
for wheel in "${wheels[@]}"; do
    python3 -m pip download -q --no-deps "${platform[@]}" -d .whl "$wheel"
done
# published as source only (pure Python): built here
python3 -m pip wheel -q --no-deps -w .whl prefetch_generator==1.0.3 varint==1.0.2 python-baseconv==1.2.2
python3 - <<'PY'
"""Keep bitsandbytes' CPU and CUDA 13 libraries (the image's torch is a CUDA 13 build), drop the rest."""
import pathlib
import re
import zipfile

path = next(pathlib.Path(".whl").glob("bitsandbytes-*.whl"))
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cpu|cuda13)\w+\.so")
trimmed = path.with_suffix(".part")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if drop.fullmatch(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not drop.fullmatch(line.split(",")[0])).encode()
        dst.writestr(item, data)
trimmed.replace(path)
PY
du -sh .whl
