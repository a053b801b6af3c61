"""The SMTP server of the API's mail tests: aiosmtpd with STARTTLS and AUTH required.

Every accepted message is written as it arrived (bytes after DATA) to OUT/<n>.eml, first
to a temporary name then renamed, so a test never reads half a file. Prints `ready PORT`
on stdout once it accepts connections. Usage:

    smtp_server.py --port P --cert CERT --key KEY --out DIR --user U --password-file F
"""

import argparse
import itertools
import os
import ssl
import sys
import threading
import warnings

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


class Save:
    def __init__(self, out):
        self.out = out
        self.counter = itertools.count(1)
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):
        if not session.authenticated:
            return "530 5.7.0 Authentication required"
        with self.lock:
            n = next(self.counter)
        tmp = os.path.join(self.out, f".{n}.tmp")
        with open(tmp, "wb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.out, f"{n:04}.eml"))
        return "250 2.0.0 OK"


def main():
    # aiosmtpd warns about its own use of a deprecated attribute on every AUTH.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password-file", required=True)
    a = p.parse_args()
    with open(a.password_file) as f:
        password = f.read().strip().encode()

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == a.user.encode()
            and auth_data.password == password
        )
        return AuthResult(success=ok)

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.cert, a.key)
    controller = Controller(
        Save(a.out),
        hostname="127.0.0.1",
        port=a.port,
        tls_context=ctx,
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
        auth_required=True,
    )
    controller.start()
    print(f"ready {a.port}", flush=True)
    try:
        sys.stdin.read()  # runs until the test closes stdin or kills it
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
