"""``opt agent``: an OpenAI Agents SDK agent whose tools are the library's workflows."""
