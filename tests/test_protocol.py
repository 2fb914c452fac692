"""The method policy docs/kafka.md recommends, checked against Codex's own protocol: every
client method of the Codex under test (``codex app-server generate-json-schema
--experimental``: experimental methods too, a client may opt in to them) is classified
here by hand, so a new Codex's new method fails this test until someone decides what it
is.  The documented deny list must refuse exactly the methods classified HOST, and the
documented allow list may name only THREAD and READ methods."""

import fnmatch
import json
import shlex
import subprocess
from typing import Dict, List, Set

import pytest

from codex_app_server import MethodPolicy
from harness import CODEX_VERSION, ROOT

# Changes what Codex is or may do beyond a conversation, or reaches past it into the host:
# its configuration, accounts and credentials, installs (plugins, skills, marketplaces), MCP
# servers, files and processes on the host, remote control, data sent to OpenAI.
HOST = """
account/bedrock/checkGovCloudRequirements account/bedrock/discover account/bedrock/setup
account/gatewayOAuth/cancel account/gatewayOAuth/login account/gatewayOAuth/read
account/gcp/setup account/login/cancel account/login/start account/logout
account/rateLimitResetCredit/consume account/rateLimits/read account/read
account/securitySetup/read account/sendAddCreditsNudgeEmail account/usage/read
account/workspaceMessages/read accountSession/list accountSession/switch
userVerification/cancel userVerification/delete userVerification/enroll
userVerification/status userVerification/verify
config/batchWrite config/mcpServer/reload config/read config/value/write
externalAgentConfig/detect externalAgentConfig/import externalAgentConfig/import/readHistories
externalAgentConfig/import/recordHistory experimentalFeature/enablement/set
modelProvider/config/write modelProvider/default/set
skills/config/write skills/extraRoots/set plugin/install plugin/uninstall plugin/reconcile
plugin/share/checkout plugin/share/delete plugin/share/list plugin/share/save
plugin/share/updateTargets marketplace/add marketplace/remove marketplace/upgrade
mcpServer/event/stream/start mcpServer/event/stream/stop mcpServer/oauth/login
mcpServer/resource/read mcpServer/tool/call
fs/copy fs/createDirectory fs/getMetadata fs/readDirectory fs/readFile fs/remove fs/unwatch
fs/watch fs/writeFile fuzzyFileSearch fuzzyFileSearch/sessionStart
fuzzyFileSearch/sessionStop fuzzyFileSearch/sessionUpdate
command/exec command/exec/resize command/exec/terminate command/exec/write
process/kill process/resizePty process/spawn process/writeStdin thread/shellCommand
thread/backgroundTerminals/clean thread/backgroundTerminals/list
thread/backgroundTerminals/terminate thread/approveGuardianDeniedAction thread/inject_items
remoteControl/client/list remoteControl/client/revoke remoteControl/disable
remoteControl/enable remoteControl/pairing/start remoteControl/pairing/status
remoteControl/status/read environment/add memory/reset rollout/compress
windowsSandbox/setupStart project/create project/delete project/import project/move
project/update feedback/save feedback/upload
""".split()

# Conversations: threads, turns, reviews (what a conversational client needs).
THREAD = """
initialize thread/start thread/resume thread/fork thread/read thread/list thread/loaded/list
thread/archive thread/unarchive thread/delete thread/unsubscribe thread/name/set
thread/metadata/update thread/compact/start thread/revert thread/turns/list thread/items/list
thread/items/read thread/goal/clear thread/goal/get thread/goal/set thread/search
thread/search/cancel thread/search/stream thread/search/stream/cancel thread/searchOccurrences
thread/sample thread/sample/cancel thread/increment_elicitation thread/decrement_elicitation
thread/prediction/request thread/queue/add thread/queue/delete thread/queue/list
thread/queue/reorder thread/queue/start thread/queue/update thread/attachment/add
thread/attachment/list thread/attachment/remove thread/attachmentOwner/list
thread/section/move thread/settings/update thread/memoryMode/set thread/memory/read
thread/readState/update thread/timeline/list thread/guardianReview thread/prepareApprovedPlan
thread/realtime/appendAudio thread/realtime/appendSpeech thread/realtime/appendText
thread/realtime/list thread/realtime/listVoices thread/realtime/start thread/realtime/stop
threadSection/create threadSection/delete threadSection/list threadSection/update
turn/interrupt turn/settings/update turn/start turn/steer review/start
""".split()

# Listings that change nothing and reveal nothing of the host or the account.
READ = """
model/list modelProvider/list modelProvider/capabilities/read collaborationMode/list
permissionProfile/list experimentalFeature/list configRequirements/read server/diagnostics
skills/list hooks/list plugin/list plugin/search plugin/installed plugin/read plugin/skill/read
app/list app/read app/installed mcpServerStatus/list memory/status environment/info
environment/status project/list project/read windowsSandbox/readiness mock/experimentalMethod
""".split()


def documented_patterns(flag: str) -> List[str]:
    """The patterns of ``flag`` in docs/kafka.md's method-policy example that uses it."""
    text = (ROOT / "docs" / "kafka.md").read_text()
    section = text[text.index("### Method policy"):]
    blocks = section.split("```")[1::2]  # the fenced blocks' contents
    block = next(block for block in blocks if flag in block)
    words = shlex.split(block.replace("\\\n", " "))
    return [words[n + 1] for n, word in enumerate(words) if word == flag]


@pytest.fixture(scope="module")
def client_methods(codex_bin, tmp_path_factory) -> Set[str]:
    out = tmp_path_factory.mktemp("schema")
    home = tmp_path_factory.mktemp("codex-home")
    subprocess.run([codex_bin, "app-server", "generate-json-schema", "--experimental",
                    "--out", str(out)], env={"CODEX_HOME": str(home), "PATH": "/usr/bin:/bin"},
                   check=True, capture_output=True, timeout=60)
    schema = json.loads((out / "ClientRequest.json").read_text())
    methods = {method for variant in schema["oneOf"]
               for method in variant["properties"]["method"]["enum"]}
    assert len(methods) > 100, methods  # the schema's shape is what this expects
    return methods


def test_every_client_method_of_this_codex_is_classified(client_methods):
    classified: Dict[str, int] = {}
    for method in HOST + THREAD + READ:
        classified[method] = classified.get(method, 0) + 1
    assert [m for m, n in classified.items() if n > 1] == []  # each in one class only
    new = sorted(client_methods - set(classified))
    assert new == [], f"Codex {CODEX_VERSION} has methods this test does not know: classify " \
                      f"them as HOST, THREAD or READ (and update docs/kafka.md): {new}"


def test_the_recommended_deny_list_refuses_exactly_the_host_methods(client_methods):
    policy = MethodPolicy(deny=documented_patterns("--deny-method"))
    refused = {method for method in client_methods if not policy.allows(method)}
    host = client_methods & set(HOST)
    assert sorted(host - refused) == [], "let through"
    assert sorted(refused - host) == [], "refused, though not HOST"


def test_the_recommended_allow_list_names_only_conversation_methods(client_methods):
    patterns = documented_patterns("--allow-method")
    policy = MethodPolicy(allow=patterns)
    allowed = {method for method in client_methods if policy.allows(method)}
    assert sorted(allowed - set(THREAD) - set(READ)) == []
    assert {"initialize", "thread/start", "turn/start"} <= allowed, allowed
    # Every pattern names something this Codex has (initialized is a notification).
    unused = [pattern for pattern in patterns if not any(
        fnmatch.fnmatchcase(method, pattern) for method in client_methods | {"initialized"})]
    assert unused == []
