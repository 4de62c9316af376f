#!/usr/bin/env python3
"""Packages keygate.wasm as an OCI image that Istio's WasmPlugin pulls (`url: oci://...`).

    python3 tools/oci/build_image.py [--wasm target/wasm32-wasip1/release/keygate.wasm]
                                     [--out target/oci/keygate] [--tag 0.1.0]

Writes an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/...`), the format
every OCI client reads (`skopeo copy oci:DIR:TAG ...`, `oras cp --from-oci-layout DIR:TAG ...`,
tools/oci/push.py), and prints the manifest digest, `sha256:<64 hex>`, on standard output.

The image is the *oci* variant of the Wasm image specification that Istio's agent accepts
(istio/istio pkg/wasm/imagefetcher.go, extractOCIArtifactImage): an OCI manifest with exactly two
layers, one of media type `application/vnd.module.wasm.content.layer.v1+wasm` whose blob is the
.wasm file byte for byte (no tar, no gzip), and the runtime configuration,
`application/vnd.module.wasm.config.v1+json`, which is also the manifest's config.

The digest depends on the .wasm alone: no timestamps, no build host, no tag in the manifest (the
tag lives only in index.json), and JSON written canonically (sorted keys, no spaces). The same
.wasm always gives the same digest, which is what a WasmPlugin's `sha256` or an
`oci://...@sha256:...` url pins.

Standard library only.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
WASM_LAYER_MEDIA_TYPE = "application/vnd.module.wasm.content.layer.v1+wasm"
WASM_CONFIG_MEDIA_TYPE = "application/vnd.module.wasm.config.v1+json"
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"

# The filter's root context name: what the shipped configurations use as root_id / pluginName.
ROOT_ID = "keygate"


class ImageError(Exception):
    pass


def canonical_json(value):
    """The one byte string a JSON value is written as: sorted keys, no insignificant spaces."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def descriptor(media_type, data, title=None):
    d = {"mediaType": media_type, "digest": sha256_digest(data), "size": len(data)}
    if title is not None:
        d["annotations"] = {TITLE: title}
    return d


def read_leb128(data, pos):
    """An unsigned LEB128 integer at data[pos:]; returns (value, next position)."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ImageError("truncated wasm module")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 35:
            raise ImageError("malformed wasm module (LEB128 too long)")


def wasm_exports(data):
    """Names of a wasm module's exports (from its export section, id 7)."""
    if data[:4] != b"\0asm":
        raise ImageError("not a wasm module (no \\0asm magic number)")
    if data[4:8] != b"\x01\0\0\0":
        raise ImageError("unsupported wasm binary version")
    pos, names = 8, []
    while pos < len(data):
        section_id = data[pos]
        size, body = read_leb128(data, pos + 1)
        end = body + size
        if end > len(data):
            raise ImageError("truncated wasm module")
        if section_id == 7:
            count, p = read_leb128(data, body)
            for _ in range(count):
                length, p = read_leb128(data, p)
                names.append(data[p : p + length].decode("utf-8", "replace"))
                p += length + 1  # the name, then the export kind byte
                _, p = read_leb128(data, p)  # the export index
        pos = end
    return names


def runtime_config(wasm):
    """The runtime configuration of the Wasm image specification, from the module's own exports."""
    abi_versions = sorted(n for n in wasm_exports(wasm) if n.startswith("proxy_abi_version_"))
    if not abi_versions:
        raise ImageError("the module exports no proxy_abi_version_*: not a proxy-wasm filter")
    return {"type": "envoy_proxy", "abiVersions": abi_versions, "config": {"rootIds": [ROOT_ID]}}


def build(wasm, tag):
    """Returns (manifest digest, {digest: blob bytes}, index.json bytes)."""
    config = canonical_json(runtime_config(wasm))
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": descriptor(WASM_CONFIG_MEDIA_TYPE, config),
            "layers": [
                descriptor(WASM_CONFIG_MEDIA_TYPE, config, "runtime-config.json"),
                descriptor(WASM_LAYER_MEDIA_TYPE, wasm, "keygate.wasm"),
            ],
        }
    )
    manifest_descriptor = descriptor(MANIFEST_MEDIA_TYPE, manifest)
    manifest_descriptor["annotations"] = {REF_NAME: tag}
    index = canonical_json({"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_descriptor]})
    blobs = {sha256_digest(b): b for b in (wasm, config, manifest)}
    return sha256_digest(manifest), blobs, index


def write_layout(out, blobs, index):
    """Writes the layout into a sibling directory, then swaps it in for `out`."""
    out = os.path.abspath(out)
    staging = out + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, "blobs", "sha256"))
    for digest, data in sorted(blobs.items()):
        with open(os.path.join(staging, "blobs", "sha256", digest.split(":", 1)[1]), "wb") as f:
            f.write(data)
    with open(os.path.join(staging, "oci-layout"), "wb") as f:
        f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    with open(os.path.join(staging, "index.json"), "wb") as f:
        f.write(index)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)


def valid_tag(tag):
    # OCI distribution spec: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
    return 0 < len(tag) <= 128 and tag[0] not in ".-" and all(c in ok for c in tag)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wasm", default="target/wasm32-wasip1/release/keygate.wasm", help="the filter")
    parser.add_argument("--out", default="target/oci/keygate", help="the OCI image layout directory to write")
    parser.add_argument("--tag", default="latest", help="the tag recorded in index.json")
    args = parser.parse_args(argv)
    if not valid_tag(args.tag):
        parser.error(f"invalid tag {args.tag!r}")
    try:
        with open(args.wasm, "rb") as f:
            wasm = f.read()
    except OSError as e:
        print(f"build_image: {args.wasm}: {e.strerror} (run `make build` first)", file=sys.stderr)
        return 1
    try:
        digest, blobs, index = build(wasm, args.tag)
    except ImageError as e:
        print(f"build_image: {args.wasm}: {e}", file=sys.stderr)
        return 1
    write_layout(args.out, blobs, index)
    print(f"{args.out}: OCI image layout, tag {args.tag}, wasm layer {sha256_digest(wasm)}", file=sys.stderr)
    print(digest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
