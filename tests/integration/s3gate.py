"""An S3 store for the tests: s3rver (npm) behind a gate that does what
s3rver does not.

s3rver accepts any SigV4 signature without checking it, so the gate checks
every request as AWS S3 would before passing it on: the signature
(recomputed from the request as received, with the secret), every x-amz-*
header signed, x-amz-content-sha256 equal to the body's SHA-256 and
Content-MD5 to its MD5. The gate also fails on demand (`down`: 503
SlowDown to everything) so tests can make the store unavailable, and
records each request (method, path, query) for assertions.

Bucket in the path (http://127.0.0.1:PORT/BUCKET/key) or in the host name
(http://BUCKET.s3.localhost:PORT/key; *.localhost is loopback): s3rver is
started with --service-endpoint localhost, so it reads the bucket from
either.
"""

import base64
import hashlib
import hmac
import http.client
import os
import subprocess
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from helpers import free_ports, wait_for

KEY_ID = "S3RVER"
SECRET = "S3RVER"
REGION = "us-east-1"
S3RVER = Path(__file__).resolve().parents[1] / "node" / "node_modules" / ".bin" / "s3rver"


def _canonical_query(raw):
    pairs = []
    for part in raw.split("&") if raw else []:
        k, _, v = part.partition("=")
        k, v = urllib.parse.unquote(k), urllib.parse.unquote(v)
        pairs.append((urllib.parse.quote(k, safe="-_.~"), urllib.parse.quote(v, safe="-_.~")))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def sigv4_problem(method, raw_path, headers, body, secret=SECRET, region=REGION):
    """None if the request is signed as AWS S3 requires, else the reason."""
    auth = headers.get("authorization", "")
    if not auth.startswith("AWS4-HMAC-SHA256 "):
        return "not AWS4-HMAC-SHA256"
    fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
    cred = fields["Credential"].split("/")
    if len(cred) != 5 or cred[2] != region or cred[3] != "s3" or cred[4] != "aws4_request":
        return f"bad credential scope {fields['Credential']}"
    signed = fields["SignedHeaders"].split(";")
    for h in ("host", "x-amz-date", "x-amz-content-sha256"):
        if h not in signed:
            return f"{h} not signed"
    for h in headers:
        if h.startswith("x-amz-") and h not in signed:
            return f"{h} present but not signed"
    payload = headers.get("x-amz-content-sha256", "")
    if payload != hashlib.sha256(body).hexdigest():
        return "XAmzContentSHA256Mismatch"
    if "content-md5" in headers:
        if headers["content-md5"] != base64.b64encode(hashlib.md5(body).digest()).decode():
            return "BadDigest (Content-MD5)"
    path, _, query = raw_path.partition("?")
    canon_headers = "".join(f"{h}:{' '.join(headers.get(h, '').split())}\n" for h in signed)
    creq = "\n".join([method, path, _canonical_query(query), canon_headers,
                      fields["SignedHeaders"], payload])
    amz_date = headers["x-amz-date"]
    scope = "/".join(cred[1:])
    sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                     hashlib.sha256(creq.encode()).hexdigest()])
    k = ("AWS4" + secret).encode()
    for part in (cred[1], region, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    want = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, fields["Signature"]):
        return "SignatureDoesNotMatch (canonical request:\n" + creq + ")"
    return None


class S3Gate:
    def __init__(self, workdir, bucket="fleetml-lake"):
        self.bucket = bucket
        self.dir = Path(workdir) / "s3rver"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.s3_port, self.port = free_ports(2)
        self.down = False
        self.requests = []  # (method, path, query, status)
        self.refused = []   # (method, path, reason)
        self.tokens = set()  # x-amz-security-token values of accepted requests
        self._lock = threading.Lock()
        self.proc = None
        self.server = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    def lake_sets(self, addressing="path", prefix=""):
        """`--set` pairs for a platform whose lake is this store."""
        ep = self.endpoint if addressing == "path" else f"http://s3.localhost:{self.port}"
        return {"lake.backend": "s3", "lake.s3_bucket": self.bucket, "lake.s3_endpoint": ep,
                "lake.s3_region": REGION, "lake.s3_addressing": addressing,
                "lake.s3_prefix": prefix, "lake.s3_access_key_id": KEY_ID,
                "lake.s3_secret_access_key": SECRET}

    def start(self):
        if not S3RVER.exists():
            raise AssertionError(f"{S3RVER} missing: run scripts/install-deps")
        self._log = open(self.dir.parent / "s3rver.log", "wb")
        self.proc = subprocess.Popen(
            [str(S3RVER), "-d", str(self.dir), "-a", "127.0.0.1", "-p", str(self.s3_port),
             "--service-endpoint", "localhost", "--configure-bucket", self.bucket],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                hdrs = {k.lower(): v for k, v in self.headers.items()}
                path, _, query = self.path.partition("?")
                if gate.down:
                    return self._answer(503, b"<?xml version=\"1.0\"?><Error><Code>SlowDown"
                                        b"</Code><Message>the gate is down</Message></Error>",
                                        path, query)
                why = sigv4_problem(self.command, self.path, hdrs, body)
                if why:
                    with gate._lock:
                        gate.refused.append((self.command, self.path, why))
                    code = why.split(" ")[0]
                    return self._answer(403 if "Signature" in code else 400,
                                        f"<?xml version=\"1.0\"?><Error><Code>{code}</Code>"
                                        f"<Message>gate</Message></Error>".encode(), path, query)
                with gate._lock:
                    if "x-amz-security-token" in hdrs:
                        gate.tokens.add(hdrs["x-amz-security-token"])
                c = http.client.HTTPConnection("127.0.0.1", gate.s3_port, timeout=60)
                fwd = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("connection", "expect")}
                c.request(self.command, self.path, body=body if n else None, headers=fwd)
                r = c.getresponse()
                data = r.read()
                headers = [(k, v) for k, v in r.getheaders()
                           if k.lower() not in ("connection", "transfer-encoding",
                                                "content-length")]
                c.close()
                self._answer(r.status, data, path, query, headers,
                             head=self.command == "HEAD", length=r.getheader("Content-Length"))

            def _answer(self, status, data, path, query, headers=(), head=False, length=None):
                with gate._lock:
                    gate.requests.append((self.command, path, query, status))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", length if head and length else str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        wait_for(lambda: self._up(), 30, interval=0.1, msg="s3rver listening")
        return self

    def _up(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"s3rver exited: {(self.dir.parent / 's3rver.log').read_text()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.s3_port, timeout=2)
            c.request("GET", "/")
            c.getresponse().read()
            c.close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        if self.proc:
            self._log.close()

    def boto3(self, through_gate=True):
        """A boto3 S3 client for reading back (through the gate, so the
        gate's own check is exercised by a second SigV4 implementation)."""
        import boto3
        from botocore.config import Config
        port = self.port if through_gate else self.s3_port
        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}",
                            aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET,
                            region_name=REGION,
                            config=Config(s3={"addressing_style": "path"},
                                          retries={"max_attempts": 1}))

    def keys(self, prefix=""):
        s3 = self.boto3()
        out, token = [], None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            r = s3.list_objects_v2(**kw)
            out += [o["Key"] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            token = r["NextContinuationToken"]

    def get(self, key):
        return self.boto3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
