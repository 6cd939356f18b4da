"""Write a copy of a GGUF file with its metadata (tokenizer included) and no tensors.

The GPU machine takes at most 64 MiB per call; benchmarks with dummy weights need only the
embedded model's tokenizer, so this ~2 MB file stands in for the 98 MB SmolLM2 GGUF there.

    python scripts/tokenizer_only_gguf.py SRC.gguf DST.gguf
"""
from __future__ import annotations

import sys

import gguf


def main(src: str, dst: str) -> None:
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = f.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(name, f.contents())
        else:
            w.add_key_value(name, f.contents(), vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
