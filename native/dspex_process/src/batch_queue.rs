//! [`push_joined`]: a queue in which small batches pushed back to back join one list.

/// Batches of at most this many items join the list at the queue's tail; larger ones are
/// pushed as they are.
pub const JOIN_AT_MOST: usize = 16;

/// A list at the tail takes no more items past this length, so that growing it (a copy of
/// the list, under the caller's lock) stays short.
pub const JOINED_AT_MOST: usize = 4_096;

/// Pushes `items` onto `queue`. When they are few (at most [`JOIN_AT_MOST`]) and the
/// queue's tail is a list of their kind (`tail_list` finds it) with room for them (up to
/// [`JOINED_AT_MOST`]), they join that list: a burst of single items allocates one growing
/// list, not one per item. Otherwise they become a new element (`wrap`), moved in as they
/// are: a `Vec` is not copied, so the caller's lock on `queue` is held for the same time
/// whatever the batch's size. Nothing is pushed for no items. The order of the items, and
/// of the queue's elements, is kept.
pub fn push_joined<N, T, I>(
    queue: &mut Vec<N>,
    items: I,
    tail_list: impl FnOnce(&mut N) -> Option<&mut Vec<T>>,
    wrap: impl FnOnce(Vec<T>) -> N,
) where
    I: IntoIterator<Item = T> + AsRef<[T]> + Into<Vec<T>>,
{
    let len = items.as_ref().len();
    if len == 0 {
        return;
    }
    if len <= JOIN_AT_MOST {
        let joinable = queue
            .last_mut()
            .and_then(tail_list)
            .filter(|list| list.len() + len <= JOINED_AT_MOST);
        if let Some(list) = joinable {
            list.extend(items);
            return;
        }
    }
    queue.push(wrap(items.into()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Item {
        Other(u32),
        List(Vec<u32>),
    }

    fn push(queue: &mut Vec<Item>, items: Vec<u32>) {
        push_joined(
            queue,
            items,
            |tail| match tail {
                Item::List(list) => Some(list),
                Item::Other(_) => None,
            },
            Item::List,
        );
    }

    #[test]
    fn items_pushed_back_to_back_join_the_list_at_the_tail() {
        let mut queue = Vec::new();
        push(&mut queue, vec![1]);
        push(&mut queue, vec![2]);
        push(&mut queue, vec![3, 4]);
        assert_eq!(queue, vec![Item::List(vec![1, 2, 3, 4])]);
    }

    #[test]
    fn a_batch_of_join_at_most_joins_and_one_more_does_not() {
        let mut queue = vec![Item::List(vec![0])];
        push(&mut queue, vec![1; JOIN_AT_MOST]);
        assert_eq!(queue.len(), 1);
        push(&mut queue, vec![2; JOIN_AT_MOST + 1]);
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn items_after_another_kind_start_a_new_list() {
        let mut queue = vec![Item::List(vec![1]), Item::Other(7)];
        push(&mut queue, vec![2]);
        assert_eq!(
            queue,
            vec![Item::List(vec![1]), Item::Other(7), Item::List(vec![2])]
        );
    }

    #[test]
    fn a_large_batch_is_pushed_whole_without_a_copy() {
        let mut queue = vec![Item::List(vec![1])];
        let large: Vec<u32> = (0..=JOIN_AT_MOST as u32).collect();
        let buffer = large.as_ptr();
        push(&mut queue, large);
        assert_eq!(queue.len(), 2);
        match &queue[1] {
            Item::List(list) => {
                assert_eq!(list.len(), JOIN_AT_MOST + 1);
                assert_eq!(list.as_ptr(), buffer, "the batch was copied");
            }
            other => panic!("expected a list, got {other:?}"),
        }
        // A small one after it joins it.
        push(&mut queue, vec![99]);
        assert_eq!(queue.len(), 2);
    }

    #[test]
    fn a_full_list_at_the_tail_takes_no_more() {
        let mut queue = vec![Item::List(vec![0; JOINED_AT_MOST - 1])];
        push(&mut queue, vec![1]);
        assert_eq!(queue.len(), 1);
        push(&mut queue, vec![2]);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue[1], Item::List(vec![2]));
    }

    #[test]
    fn no_items_push_nothing() {
        let mut queue = vec![Item::Other(1)];
        push(&mut queue, vec![]);
        assert_eq!(queue, vec![Item::Other(1)]);
        let mut empty: Vec<Item> = Vec::new();
        push(&mut empty, vec![]);
        assert!(empty.is_empty());
    }
}
