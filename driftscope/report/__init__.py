"""From stored runs to what people read: analysis tables (``tables``), plots (``plots``), LaTeX (``latex``), terminal
and Markdown text (``text``), the figure set (``figures``), an evaluate run's verdict (``verdict``)."""
