// The page's one way to make an element: tag, class and text in one call.

/** A new `tag` element with `className` and, when given, `text` as its text. */
export function element(tag, className = "", text = undefined) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
