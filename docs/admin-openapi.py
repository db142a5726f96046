#!/usr/bin/env python3
# Writes docs/admin-openapi.json, the admin API's OpenAPI document (served at
# GET /v1/openapi.json). Usage:
#   python3 docs/admin-openapi.py application/openmetrics-text docs/admin-openapi.json
# The first argument is the content type documented for GET /metrics.
import json
MAX = 2**53 - 1
ref = lambda n: {"$ref": f"#/components/schemas/{n}"}
def resp(desc, schema=None, ctype="application/json", headers=None):
    r = {"description": desc}
    if schema is not None:
        r["content"] = {ctype: {"schema": schema}}
    if headers: r["headers"] = headers
    return r
err = lambda d: resp(d, ref("ErrorEnvelope"))
common = {"401": err("No admin token, or not one of `[admin] tokens`"),
          "405": err("The path does not take this method")}
store = {"503": err("The quota store did not answer within `store.timeout`")}
org_param = {"name": "org", "in": "path", "required": True, "description": "An org id",
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}}
bad = {"400": err("A malformed org id or body")}
secured = [{"bearer": []}]
amount = {"type": "integer", "minimum": 0, "maximum": MAX}
limit = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX}
def op(summary, responses, body=None, params=None, secure=True, opid=None):
    o = {"summary": summary, "operationId": opid, "responses": responses}
    if secure: o["security"] = secured
    else: o["security"] = []
    if params: o["parameters"] = params
    if body is not None:
        o["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return o
big = {"413": err("The body is larger than 64 KiB")}
link_op = op("A signed, expiring link to the org's usage page on the main listener",
    {"201": resp("The link", {"type": "object", "additionalProperties": False, "required": ["org", "url", "expiresAt"], "properties": {
        "org": {"type": "string"},
        "url": {"type": "string", "description": "the path and query of the link, e.g. /_tollgate/usage?org=org_acme&expires=1767225600&sig=...; this listener does not know the host customers reach the main listener by, so prefix it with that origin"},
        "expiresAt": {"type": "string", "format": "date-time"}}}),
     **bad, **big, "409": err("[usage_page] is not configured"), **common},
    body={"type": "object", "additionalProperties": False, "properties": {
        "expiresIn": {"type": "integer", "minimum": 1, "maximum": 90 * 24 * 3600, "description": "seconds the link lives; 7 days when not given"}}},
    opid="createUsageLink")
link_op["requestBody"]["required"] = False
doc = {
 "openapi": "3.1.0",
 "info": {"title": "tollgate admin API", "version": "1",
          "description": "Health, metrics, usage, runtime orgs and API keys, the dry run and reload, on the `[admin] listen` address. Everything under /v1/ needs `Authorization: Bearer <token>` (the GET endpoints also take the session cookie of the /ui pages, which are not part of this document); every error is the gateway's JSON envelope."},
 "components": {
  "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
  "schemas": {
   "ErrorEnvelope": {"type": "object", "required": ["success", "error"], "properties": {
       "success": {"const": False}, "error": ref("Error")}},
   "Error": {"type": "object", "required": ["code", "message"], "properties": {
       "code": {"type": "string"}, "message": {"type": "string"},
       "details": {"type": "object"}}},
   "QuotaError": {"type": "object", "required": ["code", "message", "details"], "properties": {
       "code": {"const": "QUOTA_EXCEEDED"}, "message": {"type": "string"},
       "details": {"type": "object", "required": ["type", "quotaType", "currentUsage", "limit", "requested", "billingStatus", "planSlug", "periodStart", "periodEnd"],
         "properties": {"type": {"const": "quota_exceeded"}, "quotaType": ref("Dimension"),
           "currentUsage": {"type": "integer"}, "limit": {"type": "integer"}, "requested": {"type": "integer"},
           "billingStatus": {"type": "string"}, "planSlug": {"type": "string"},
           "periodStart": {"type": "string", "format": "date-time"}, "periodEnd": {"type": "string", "format": "date-time"}}}}},
   "Dimension": {"enum": ["tokens", "playbook_runs", "seats"]},
   "Enforcement": {"enum": ["enforce", "shadow", "off"]},
   "Used": {"type": "object", "required": ["used", "limit", "remaining"], "additionalProperties": False, "properties": {
       "used": {"type": "integer"}, "limit": {"type": ["integer", "null"]}, "remaining": {"type": ["integer", "null"], "minimum": 0}}},
   "Usage": {"type": "object", "required": ["tokens", "playbook_runs", "seats"], "additionalProperties": False, "properties": {
       "tokens": ref("Used"), "playbook_runs": ref("Used"), "seats": ref("Used")}},
   "Summary": {"type": "object", "additionalProperties": False,
       "required": ["org", "plan", "billingStatus", "enforcement", "periodStart", "periodEnd", "usage"], "properties": {
       "org": {"type": "string"}, "plan": {"type": "string"}, "billingStatus": {"type": "string"},
       "enforcement": ref("Enforcement"), "periodStart": {"type": "string", "format": "date-time"},
       "periodEnd": {"type": "string", "format": "date-time"}, "usage": ref("Usage")}},
   "Limits": {"type": "object", "required": ["tokens", "playbook_runs", "seats"], "additionalProperties": False, "properties": {
       "tokens": {"type": ["integer", "null"]}, "playbook_runs": {"type": ["integer", "null"]}, "seats": {"type": ["integer", "null"]}}},
   "Org": {"type": "object", "additionalProperties": False,
       "required": ["org", "plan", "billingStatus", "periodAnchorDay", "enforcement", "limits", "source"], "properties": {
       "org": {"type": "string"}, "plan": {"type": "string"}, "billingStatus": {"type": "string"},
       "periodAnchorDay": {"type": "integer", "minimum": 1, "maximum": 31}, "enforcement": ref("Enforcement"),
       "limits": ref("Limits"), "source": {"enum": ["config", "runtime", "defaults"]}}},
   "OrgChange": {"type": "object", "additionalProperties": False,
       "description": "A runtime org: the fields named override the file's org (or [defaults]); a PUT replaces the runtime org whole. A field that is null is not named.",
       "properties": {
       "plan": {"type": ["string", "null"], "description": "a plan of the config's [plans]; the document served at /v1/openapi.json lists the running config's"},
       "billingStatus": {"type": ["string", "null"], "minLength": 1, "maxLength": 64},
       "periodAnchorDay": {"type": ["integer", "null"], "minimum": 1, "maximum": 31},
       "enforcement": {"enum": ["enforce", "shadow", "off", None]},
       "limits": {"type": "object", "additionalProperties": False, "properties": {
           "tokens": limit, "playbook_runs": limit, "seats": limit}}}},
   "NewKey": {"type": "object", "additionalProperties": False, "required": ["org", "name"], "properties": {
       "org": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}, "name": {"type": "string", "minLength": 1, "maxLength": 128}}},
   "CreatedKey": {"type": "object", "additionalProperties": False, "required": ["id", "key", "org", "name"], "properties": {
       "id": {"type": "string"}, "key": {"type": "string", "description": "shown once; only its sha256 is kept"},
       "org": {"type": "string"}, "name": {"type": "string"}}},
   "Key": {"type": "object", "additionalProperties": False, "required": ["id", "org", "name", "createdAt"], "properties": {
       "id": {"type": "string"}, "org": {"type": "string"}, "name": {"type": "string"},
       "createdAt": {"type": "string", "format": "date-time"}}},
   "Check": {"type": "object", "additionalProperties": False, "required": ["org"], "properties": {
       "org": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
       "cost": {"type": "object", "additionalProperties": False, "properties": {
           "tokens": amount, "playbook_runs": amount, "seats": amount}}}},
  }},
 "paths": {
  "/healthz": {"get": op("Liveness", {"200": resp("The process serves", {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}), "405": common["405"]}, secure=False, opid="healthz")},
  "/readyz": {"get": op("Readiness: the store answers", {
      "200": resp("Ready", {"type": "object", "required": ["status", "store"], "properties": {"status": {"const": "ready"}, "store": {"const": "ok"}}}),
      "503": resp("The store does not answer", {"type": "object", "required": ["status", "store"], "properties": {"status": {"const": "not_ready"}, "store": {"const": "unreachable"}}}),
      "405": common["405"]}, secure=False, opid="readyz")},
  "/metrics": {"get": op("Prometheus metrics", {"200": resp("The metrics", {"type": "string"}, ctype="METRICS_CONTENT_TYPE"), "405": common["405"]}, secure=False, opid="metrics")},
  "/v1/openapi.json": {"get": op("This document", {"200": resp("OpenAPI 3.1", {"type": "object"}), **common}, opid="openapi")},
  "/v1/orgs": {"get": op("Every org of the config and the store", {"200": resp("The orgs", {"type": "object", "required": ["orgs"], "properties": {"orgs": {"type": "array", "items": ref("Org")}}}), **common, **store}, opid="listOrgs")},
  "/v1/orgs/{org}": {
     "parameters": [org_param],
     "get": op("The policy in effect for an org", {"200": resp("The policy", ref("Org")), **bad, **common}, opid="getOrg"),
     "put": op("Create or replace a runtime org", {"200": resp("The policy now in effect", ref("Org")), **bad, **big, **common, **store}, body=ref("OrgChange"), opid="putOrg"),
     "delete": op("Remove a runtime org", {"200": resp("The policy now in effect", ref("Org")), **bad, "404": err("The org has no runtime policy"), **common, **store}, opid="deleteOrg")},
  "/v1/orgs/{org}/usage": {
     "parameters": [org_param],
     "get": op("An org's usage this period, read from the store", {"200": resp("The summary", ref("Summary")), **bad, **common, **store}, opid="getUsage"),
     "delete": op("Reset every period counter of the current period (seats stay)", {"200": resp("The new summary", ref("Summary")), **bad, **common, **store}, opid="resetUsage")},
  "/v1/orgs/{org}/usage/{dimension}": {
     "parameters": [org_param, {"name": "dimension", "in": "path", "required": True, "schema": ref("Dimension")}],
     "put": op("Set one counter of the current period (seats: the gauge)", {"200": resp("The new summary", ref("Summary")), **bad, **big, **common, **store},
               body={"type": "object", "additionalProperties": False, "required": ["used"], "properties": {"used": amount}}, opid="setUsage")},
  "/v1/usage": {"get": op("The usage summary of every org /v1/orgs lists, in one answer", {"200": resp("The summaries", {"type": "object", "additionalProperties": False, "required": ["orgs"], "properties": {"orgs": {"type": "array", "items": ref("Summary")}}}), **common, **store}, opid="listUsage")},
  "/v1/orgs/{org}/usage-link": {
     "parameters": [org_param],
     "post": link_op},
  "/v1/keys": {
     "post": op("Create a gateway API key", {"201": resp("The key, shown once", ref("CreatedKey")), **bad, **big, **common, **store}, body=ref("NewKey"), opid="createKey"),
     "get": op("List runtime API keys, never the keys themselves", {"200": resp("The keys", {"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": ref("Key")}}}), **bad, **common},
               params=[{"name": "org", "in": "query", "required": True, "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}}], opid="listKeys")},
  "/v1/keys/{id}": {
     "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
     "delete": op("Revoke a key on every instance", {"200": resp("Revoked", {"type": "object", "additionalProperties": False, "required": ["id", "revoked"], "properties": {"id": {"type": "string"}, "revoked": {"const": True}}}), "404": err("No runtime key has this id"), **common, **store}, opid="revokeKey")},
  "/v1/check": {"post": op("Dry run: the decision a reservation would get, reserving nothing", {
      "200": resp("The decision", {"oneOf": [
          {"type": "object", "additionalProperties": False, "required": ["allowed", "usage"], "properties": {"allowed": {"const": True}, "usage": ref("Usage")}},
          {"type": "object", "additionalProperties": False, "required": ["allowed", "error"], "properties": {"allowed": {"const": False}, "error": ref("QuotaError")}}]}),
      **bad, **big, **common, **store}, body=ref("Check"), opid="check")},
  "/v1/reload": {"post": op("Reload the config file (as SIGHUP)", {
      "200": resp("Applied to new requests", {"type": "object", "additionalProperties": False, "required": ["reloaded", "restartRequired"], "properties": {
          "reloaded": {"const": True}, "restartRequired": {"type": "array", "items": {"type": "string"}, "description": "changed keys that apply only after a restart"}}}),
      "409": err("Started without a config file"),
      "422": err("The file has problems (details.errors: every one, with file:line and key); nothing changed"),
      **common}, opid="reload")},
 }}
import sys
text = json.dumps(doc, indent=2).replace("METRICS_CONTENT_TYPE", sys.argv[1])
open(sys.argv[2], "w").write(text + "\n")
