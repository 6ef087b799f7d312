"""The wire contract: topics (``topics``), data-plane frames (``codec``), control
messages (``control``) and chunk reassembly (``reassembly``). Pure; no I/O."""
