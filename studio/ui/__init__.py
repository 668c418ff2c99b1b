"""The Gradio web app: ``app.py`` composes the tabs; each tab or panel lives in its own file."""
