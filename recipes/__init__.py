"""Shipped recipes. Each file defines ``recipe()`` returning a launcher.recipe.Recipe; copy one to start your own."""
