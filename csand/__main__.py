from csand.cli import app

app()
