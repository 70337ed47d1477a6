"""Every flow.metadata key coze-mitm uses, in one leaf module that every part may import.

flow.metadata is how the parts hand a decision made in one hook to a later hook (or a later part): the
decision is made once, on the request as the client sent it, before anything (map_remote, another addon)
could rewrite its host. `-w` files save it and mitmweb shows it, so no value here is ever a secret.
"""

COZE_USER = "coze_user"  # the (full) user id whose credential this flow carries (auth)
REFUSED = "coze_refused"  # the reason (a fixed word) of a local answer instead of forwarding (auth)
TOKEN_RETRY = "coze_token_retry"  # what the transparent retry did (retry; shown in mitmweb)
CORS_ORIGIN = "coze_cors_origin"  # the allowed origin this flow's response is for (cors)
CORS_SET = "coze_cors_set"  # its response got the CORS headers in responseheaders already (cors)
CSP_PAGE = "coze_csp_page"  # the allowed page origin, decided before anything rewrote the URL (csp)
CSP_DONE = "coze_csp_done"  # headers already handled: responseheaders, then response (csp)
INJECT_PAGE = "coze_inject_page"  # the allowed page origin whose document gets the loader (inject)
DEMO_ROUTED = "coze_demo_routed"  # this request was sent on to the local sandbox (demo)
LOCAL_ANSWER = "coze_local_answer"  # this response never came from upstream (answers)
PROXYAUTH = "proxyauth"  # mitmproxy's own: (username, password) of the proxy login; the password is removed (login)
DIRECT = "coze_direct"  # the proxy's own address this request was sent to ("127.0.0.1:8080"), now the Coze API's (direct_api)
