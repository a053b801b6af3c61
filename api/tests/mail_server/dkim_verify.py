"""Verifies a message's DKIM signature with dkimpy, an implementation independent of the
API's, against a DNS TXT record given on the command line (no DNS lookup).

    dkim_verify.py MESSAGE_FILE RECORD_NAME RECORD_VALUE

Prints `pass` and exits 0 when the signature verifies, prints `fail` (and dkimpy's
exception, if it raised one) and exits 1 otherwise.
"""

import sys

import dkim


def main():
    path, name, value = sys.argv[1], sys.argv[2].rstrip("."), sys.argv[3]
    with open(path, "rb") as f:
        message = f.read()

    def dnsfunc(domain, timeout=5):
        asked = domain.decode() if isinstance(domain, bytes) else domain
        return value.encode() if asked.rstrip(".") == name else b""

    try:
        ok = dkim.verify(message, dnsfunc=dnsfunc)
    except Exception as e:  # dkimpy raises on some mismatches (an RSA signature, an Ed25519 key)
        print(f"fail ({type(e).__name__}: {e})")
        sys.exit(1)
    print("pass" if ok else "fail")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
