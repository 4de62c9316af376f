#!/usr/bin/env python3
"""Pushes an OCI image layout (tools/oci/build_image.py) to a registry, by the OCI distribution API.

    python3 tools/oci/push.py target/oci/keygate registry.example.com/team/keygate:0.1.0
    python3 tools/oci/push.py target/oci/keygate 127.0.0.1:5000/keygate          # tag from the layout

Uploads each blob the registry lacks (HEAD, then POST + monolithic PUT), then PUTs the manifest
under the tag, and checks that the registry files it under the digest the layout has. Prints
`<registry>/<repository>:<tag>@sha256:<digest>` on standard output: the reference to put in a
WasmPlugin's `url` (with `oci://` in front).

HTTPS unless --plain-http is given or the registry is on loopback (127.0.0.0/8, localhost, ::1).
Credentials, when the registry asks for them, come from the environment, never the command line:
REGISTRY_USERNAME and REGISTRY_PASSWORD (HTTP Basic, or exchanged for a Bearer token at the realm
the registry names). Other clients read the same layout: `skopeo copy oci:DIR:TAG docker://...`,
`oras cp --from-oci-layout DIR:TAG ...`.

Standard library only.
"""

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request

MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
REF_NAME = "org.opencontainers.image.ref.name"
TIMEOUT_S = 60


class PushError(Exception):
    pass


def parse_reference(text):
    """`host[:port]/repo/path[:tag]` -> (host, repository, tag or None)."""
    host, sep, rest = text.partition("/")
    if not sep or not rest or not (("." in host) or (":" in host) or host == "localhost"):
        raise PushError(f"{text!r}: expected REGISTRY/REPOSITORY[:TAG], e.g. 127.0.0.1:5000/keygate:0.1.0")
    repo, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = rest.rsplit(":", 1)
    if "@" in rest:
        raise PushError(f"{text!r}: push by tag; the digest is the layout's")
    if not re.fullmatch(r"[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*", repo):
        raise PushError(f"{text!r}: invalid repository name {repo!r}")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", tag):
        raise PushError(f"{text!r}: invalid tag {tag!r}")
    return host, repo, tag


def is_loopback(host):
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_layout(layout, tag):
    """The manifest to push: (its bytes, its media type, its digest, the layout's tag for it)."""
    try:
        with open(os.path.join(layout, "oci-layout"), "rb") as f:
            if json.load(f).get("imageLayoutVersion") != "1.0.0":
                raise PushError(f"{layout}: unsupported oci-layout version")
        with open(os.path.join(layout, "index.json"), "rb") as f:
            manifests = json.load(f).get("manifests") or []
    except (OSError, ValueError) as e:
        raise PushError(f"{layout}: not an OCI image layout ({e}); run `make image` first") from e
    if tag is not None:
        chosen = [m for m in manifests if m.get("annotations", {}).get(REF_NAME) == tag] or manifests[:1]
    else:
        chosen = manifests
    if len(chosen) != 1:
        raise PushError(f"{layout}: {len(manifests)} manifests in index.json; name one by its tag")
    desc = chosen[0]
    if desc.get("mediaType") not in MANIFEST_MEDIA_TYPES:
        raise PushError(f"{layout}: {desc.get('mediaType')} is not an image manifest")
    manifest = read_blob(layout, desc["digest"])
    return manifest, desc["mediaType"], desc["digest"], desc.get("annotations", {}).get(REF_NAME)


def read_blob(layout, digest):
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hex_digest):
        raise PushError(f"unsupported digest {digest!r}")
    path = os.path.join(layout, "blobs", "sha256", hex_digest)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PushError(f"{path}: {e.strerror}") from e
    if hashlib.sha256(data).hexdigest() != hex_digest:
        raise PushError(f"{path}: content does not match its digest")
    return data


class Registry:
    """The few calls of the OCI distribution API a push needs, with Basic or Bearer auth."""

    def __init__(self, host, repo, scheme):
        self.base = f"{scheme}://{host}"
        self.repo = repo
        self.authorization = None
        self.username = os.environ.get("REGISTRY_USERNAME")
        self.password = os.environ.get("REGISTRY_PASSWORD")

    def request(self, method, url, data=None, headers=None, retry_auth=True):
        if url.startswith("/"):
            url = self.base + url
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.authorization:
            req.add_header("Authorization", self.authorization)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            if e.code == 401 and retry_auth and self.authenticate(e.headers.get("WWW-Authenticate", "")):
                return self.request(method, url, data, headers, retry_auth=False)
            if e.code == 401:
                if self.username is None or self.password is None:
                    raise PushError(
                        f"{self.base}: the registry wants credentials: set REGISTRY_USERNAME and REGISTRY_PASSWORD"
                    ) from e
                raise PushError(f"{self.base}: the registry refused the credentials for {self.repo}") from e
            return e.code, e.headers, body
        except urllib.error.URLError as e:
            raise PushError(f"{method} {url}: {e.reason}") from e

    def authenticate(self, challenge):
        scheme, _, params = challenge.partition(" ")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        basic = None
        if self.username is not None and self.password is not None:
            basic = "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        if scheme.lower() == "basic":
            self.authorization = basic
            return basic is not None
        if scheme.lower() != "bearer" or "realm" not in fields:
            return False
        query = {"scope": f"repository:{self.repo}:pull,push"}
        if "service" in fields:
            query["service"] = fields["service"]
        req = urllib.request.Request(fields["realm"] + "?" + urllib.parse.urlencode(query))
        if basic:
            req.add_header("Authorization", basic)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                token = json.load(resp)
        except (urllib.error.URLError, ValueError) as e:
            raise PushError(f"getting a token from {fields['realm']}: {e}") from e
        token = token.get("token") or token.get("access_token")
        if not token:
            return False
        self.authorization = "Bearer " + token
        return True

    def push_blob(self, digest, data):
        status, _, _ = self.request("HEAD", f"/v2/{self.repo}/blobs/{digest}")
        if status == 200:
            return False
        status, headers, body = self.request("POST", f"/v2/{self.repo}/blobs/uploads/", b"")
        if status != 202 or not headers.get("Location"):
            raise PushError(f"starting the upload of {digest}: HTTP {status} {body[:200]!r}")
        location = urllib.parse.urljoin(self.base + "/", headers["Location"])
        location += ("&" if "?" in location else "?") + urllib.parse.urlencode({"digest": digest})
        status, _, body = self.request(
            "PUT", location, data, {"Content-Type": "application/octet-stream", "Content-Length": str(len(data))}
        )
        if status != 201:
            raise PushError(f"uploading {digest}: HTTP {status} {body[:200]!r}")
        return True

    def push_manifest(self, tag, manifest, media_type, digest):
        status, headers, body = self.request(
            "PUT", f"/v2/{self.repo}/manifests/{tag}", manifest, {"Content-Type": media_type}
        )
        if status != 201:
            raise PushError(f"putting the manifest: HTTP {status} {body[:300]!r}")
        filed = headers.get("Docker-Content-Digest")
        if filed and filed != digest:
            raise PushError(f"the registry filed the manifest as {filed}, not {digest}")


def push(layout, reference, plain_http=False, log=sys.stderr):
    host, repo, tag = parse_reference(reference)
    manifest, media_type, digest, layout_tag = read_layout(layout, tag)
    tag = tag or layout_tag
    if not tag:
        raise PushError(f"{reference}: no tag given, and the layout names none")
    scheme = "http" if plain_http or is_loopback(host) else "https"
    registry = Registry(host, repo, scheme)
    parsed = json.loads(manifest)
    blobs = [parsed["config"]] + parsed.get("layers", [])
    seen = set()
    for blob in blobs:
        if blob["digest"] in seen:
            continue
        seen.add(blob["digest"])
        uploaded = registry.push_blob(blob["digest"], read_blob(layout, blob["digest"]))
        print(f"{'uploaded' if uploaded else 'exists  '} {blob['digest']} {blob['mediaType']}", file=log)
    registry.push_manifest(tag, manifest, media_type, digest)
    return f"{host}/{repo}:{tag}@{digest}"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("layout", help="an OCI image layout directory, e.g. target/oci/keygate")
    parser.add_argument("reference", help="REGISTRY/REPOSITORY[:TAG]")
    parser.add_argument("--plain-http", action="store_true", help="HTTP instead of HTTPS")
    args = parser.parse_args(argv)
    try:
        print(push(args.layout, args.reference, args.plain_http))
    except PushError as e:
        print(f"push: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
