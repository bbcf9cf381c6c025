"""OpenAI's POST endpoints by what they cost, from its API reference: the lists the endpoint
classification and the budget gate are tested against."""

# POST endpoints of OpenAI's API reference that bill the caller (tokens, images, audio seconds,
# storage, compute), besides the four metered ones.
OPENAI_BILLABLE = [
    "/v1/images/generations", "/v1/images/edits", "/v1/images/variations",
    "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/batches", "/v1/files", "/v1/uploads", "/v1/uploads/upload_1/parts",
    "/v1/uploads/upload_1/complete", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/ftjob-1/resume",
    "/v1/threads/runs", "/v1/threads/thread_1/runs",
    "/v1/threads/thread_1/runs/run_1/submit_tool_outputs",
    "/v1/realtime/sessions", "/v1/realtime/transcription_sessions", "/v1/realtime/client_secrets",
    "/v1/realtime/calls/call_1/accept",
    "/v1/vector_stores", "/v1/vector_stores/vs_1/files", "/v1/vector_stores/vs_1/file_batches",
    "/v1/vector_stores/vs_1/search", "/v1/videos", "/v1/videos/video_1/remix",
    "/v1/containers", "/v1/containers/cntr_1/files", "/v1/evals/eval_1/runs",
]
# Priced from their usage: the four operations, and compaction (`client.responses.compact`), a
# Responses call whose answer reports Responses usage.
METERED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
           "/v1/responses/compact"]
# POSTs that cost nothing, and every cancellation: a campaign over its limit can still stop work.
OPENAI_FREE = [
    "/v1/moderations", "/v1/responses/input_tokens", "/v1/threads", "/v1/threads/thread_1",
    "/v1/threads/thread_1/messages", "/v1/threads/thread_1/messages/msg_1", "/v1/assistants",
    "/v1/assistants/asst_1", "/v1/conversations", "/v1/conversations/conv_1/items",
    "/v1/chat/completions/chatcmpl-1", "/v1/evals", "/v1/batches/batch_1/cancel",
    "/v1/fine_tuning/jobs/ftjob-1/cancel", "/v1/threads/thread_1/runs/run_1/cancel",
    "/v1/vector_stores/vs_1/file_batches/vsfb_1/cancel", "/v1/uploads/upload_1/cancel",
]
