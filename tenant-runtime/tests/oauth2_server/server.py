"""A real OAuth 2 authorization server for the runtime's OAuth tests.

Authlib's AuthorizationServer (Flask integration) with:
- the authorization-code grant, PKCE required (RFC 7636; S256 or nothing),
- the refresh-token grant with rotation: each refresh issues a new refresh token and
  revokes the old one, so a client that keeps using an old one gets `invalid_grant`,
- the RFC 7009 revocation endpoint,
served by Werkzeug over HTTPS with the certificate the test made.

The user is always "alice" and consents at once: GET /authorize answers with the
redirect to the client's redirect URI carrying the code, as a provider does after the
consent screen.

What the test may look at or change (never part of OAuth itself):
- GET  /test/state: every token issued (values, client, grant type, revoked or not),
  counts of token requests by grant type with the time of each, and every revocation
  request;
- POST /test/revoke-all?client_id=: revokes every token of a client, as a user who
  removes the app's access at the provider would;
- POST /test/fail-next?n=: the next n token requests answer 503;
- POST /moved/token: answers 307 to the host given by --redirect-to (a provider
  endpoint that redirects elsewhere).

Usage: server.py --cert CERT --key KEY --client ID:SECRET:REDIRECT_URI [...]
                 [--expires-in SECONDS] [--redirect-to URL]
Prints "LISTENING <port>" once it accepts connections on 127.0.0.1.
"""

import argparse
import secrets
import ssl
import sys
import threading
import time

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, ClientMixin, TokenMixin
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, jsonify, redirect, request
from werkzeug.serving import make_server

LOCK = threading.RLock()
CLIENTS = {}
CODES = {}
TOKENS = []
REVOCATIONS = []
TOKEN_REQUESTS = {"authorization_code": 0, "refresh_token": 0, "failed_on_purpose": 0}
REQUEST_LOG = []
FAIL_NEXT = [0]
USER = "alice"


class Client(ClientMixin):
    def __init__(self, client_id, client_secret, redirect_uri):
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uri = redirect_uri

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uri

    def get_allowed_scope(self, scope):
        return scope or ""

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri == self.redirect_uri

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type in ("authorization_code", "refresh_token")


class Code(AuthorizationCodeMixin):
    def __init__(self, code, client_id, redirect_uri, scope, challenge, method):
        self.code = code
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self.scope = scope
        self.code_challenge = challenge
        self.code_challenge_method = method

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope


class Token(TokenMixin):
    def __init__(self, client_id, grant_type, token):
        self.client_id = client_id
        self.grant_type = grant_type
        self.access_token = token["access_token"]
        self.refresh_token = token.get("refresh_token")
        self.scope = token.get("scope", "")
        self.expires_in = token["expires_in"]
        self.issued_at = time.time()
        self.revoked = False

    def check_client(self, client):
        return self.client_id == client.client_id

    def get_scope(self):
        return self.scope

    def get_expires_in(self):
        return self.expires_in

    def is_expired(self):
        return time.time() > self.issued_at + self.expires_in

    def is_revoked(self):
        return self.revoked

    def get_user(self):
        return USER

    def get_client(self):
        return CLIENTS[self.client_id]

    def as_json(self):
        return {
            "client_id": self.client_id,
            "grant_type": self.grant_type,
            "access_token": self.access_token,
            "refresh_token": self.refresh_token,
            "scope": self.scope,
            "expires_in": self.expires_in,
            "issued_at": self.issued_at,
            "revoked": self.revoked,
        }


class AuthorizationCodeGrant(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def save_authorization_code(self, code, req):
        with LOCK:
            CODES[code] = Code(
                code,
                req.client.client_id,
                req.payload.redirect_uri,
                req.scope,
                req.payload.data.get("code_challenge"),
                req.payload.data.get("code_challenge_method"),
            )

    def query_authorization_code(self, code, client):
        with LOCK:
            found = CODES.get(code)
        if found is not None and found.client_id == client.client_id:
            return found
        return None

    def delete_authorization_code(self, authorization_code):
        with LOCK:
            CODES.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code):
        return USER


class RefreshTokenGrant(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
    # Rotation: every refresh hands out a new refresh token...
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token):
        with LOCK:
            for token in TOKENS:
                if token.refresh_token == refresh_token and not token.revoked:
                    return token
        return None

    def authenticate_user(self, credential):
        return USER

    def revoke_old_credential(self, credential):
        # ... and the one it replaced stops working.
        with LOCK:
            credential.revoked = True


class Revocation(RevocationEndpoint):
    CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

    def query_token(self, token_string, token_type_hint):
        with LOCK:
            for token in TOKENS:
                if token_string in (token.access_token, token.refresh_token):
                    return token
        return None

    def revoke_token(self, token, req):
        with LOCK:
            token.revoked = True
            REVOCATIONS.append(
                {
                    "client_id": token.client_id,
                    "token": req.form.get("token"),
                    "token_type_hint": req.form.get("token_type_hint"),
                }
            )


def save_token(token, req):
    grant_type = req.payload.grant_type if req.payload else None
    with LOCK:
        TOKENS.append(Token(req.client.client_id, grant_type, token))


def build_app(expires_in, redirect_to):
    app = Flask(__name__)
    app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = True
    app.config["OAUTH2_TOKEN_EXPIRES_IN"] = {
        "authorization_code": expires_in,
        "refresh_token": expires_in,
    }
    server = AuthorizationServer(app, query_client=CLIENTS.get, save_token=save_token)
    server.register_grant(AuthorizationCodeGrant, [CodeChallenge(required=True)])
    server.register_grant(RefreshTokenGrant)
    server.register_endpoint(Revocation)

    @app.get("/authorize")
    def authorize():
        grant = server.get_consent_grant(end_user=USER)
        return server.create_authorization_response(grant=grant, grant_user=USER)

    @app.post("/token")
    def token():
        grant_type = request.form.get("grant_type", "")
        with LOCK:
            failing = FAIL_NEXT[0] > 0
            if failing:
                FAIL_NEXT[0] -= 1
                TOKEN_REQUESTS["failed_on_purpose"] += 1
            else:
                TOKEN_REQUESTS[grant_type] = TOKEN_REQUESTS.get(grant_type, 0) + 1
            REQUEST_LOG.append(
                {"grant_type": grant_type, "at": time.time(), "failed_on_purpose": failing}
            )
        if failing:
            return jsonify(error="temporarily_unavailable"), 503
        return server.create_token_response()

    @app.post("/revoke")
    def revoke():
        return server.create_endpoint_response(Revocation.ENDPOINT_NAME)

    @app.post("/moved/token")
    def moved():
        return redirect(redirect_to, code=307)

    @app.get("/test/state")
    def state():
        with LOCK:
            return jsonify(
                tokens=[t.as_json() for t in TOKENS],
                token_requests=TOKEN_REQUESTS,
                request_log=REQUEST_LOG,
                revocations=REVOCATIONS,
                pending_codes=len(CODES),
            )

    @app.post("/test/revoke-all")
    def revoke_all():
        client_id = request.args["client_id"]
        with LOCK:
            n = 0
            for token in TOKENS:
                if token.client_id == client_id and not token.revoked:
                    token.revoked = True
                    n += 1
        return jsonify(revoked=n)

    @app.post("/test/fail-next")
    def fail_next():
        with LOCK:
            FAIL_NEXT[0] = int(request.args["n"])
        return jsonify(failing=FAIL_NEXT[0])

    return app


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--client", action="append", default=[])
    parser.add_argument("--expires-in", type=int, default=3600)
    parser.add_argument("--redirect-to", default="https://elsewhere.invalid/token")
    args = parser.parse_args()
    for spec in args.client:
        client_id, client_secret, redirect_uri = spec.split(":", 2)
        CLIENTS[client_id] = Client(client_id, client_secret, redirect_uri)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    app = build_app(args.expires_in, args.redirect_to)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=context)
    print(f"LISTENING {server.server_port}", flush=True)
    # The test closes our stdin when it is done with us (and so does its death).
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
